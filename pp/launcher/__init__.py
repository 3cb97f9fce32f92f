"""The `pp.run` launcher: config, models, data, training loop, checkpoints, metrics (see the README, "Training with `pp.run`")."""
