"""Where rank 0's per-step scalars go besides metrics.jsonl: TensorBoard and Weights & Biases.

TensorBoard: `output.dir/tensorboard/`, flushed at checkpoints. A run resumed at step N+1 opens its writer
with `purge_step=N+1`, so TensorBoard hides what an interrupted run logged past the checkpoint and each
curve has one point per step.
"""
from __future__ import annotations

import os
from typing import Any

SCALARS = ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_gib",
           "bubble")


class ScalarSinks:
    """`write(record)` logs the known scalars of one step's record under `train/<name>`."""

    def __init__(self, out_dir: str, done_steps: int, tensorboard: bool, wandb: bool, config: dict):
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                     purge_step=done_steps + 1 if done_steps > 0 else None)
        if wandb:
            import wandb as wandb_module

            name = os.path.basename(os.path.abspath(out_dir))
            self._wandb = wandb_module.init(project=os.environ.get("WANDB_PROJECT", "pp"), name=name,
                                            dir=out_dir, config=config, resume="allow",
                                            id=os.environ.get("WANDB_RUN_ID", name))

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        values = {k: float(record[k]) for k in SCALARS if record.get(k) is not None}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
