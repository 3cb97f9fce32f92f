"""The `pp.run` launcher: config, models, data, training loop, checkpoints, metrics (see docs/launcher.md)."""
