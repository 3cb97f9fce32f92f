"""Where rank 0's per-step scalars go besides metrics.jsonl: TensorBoard and Weights & Biases.

TensorBoard: `output.dir/tensorboard/`, flushed at checkpoints. A run resumed at step N+1 opens its writer
with `purge_step=N+1`, so TensorBoard hides what an interrupted run logged past the checkpoint and each
curve has one point per step. A fresh run owns output.dir: when it logs its first step, the event files
of an earlier run there are removed (as metrics.jsonl is rewritten), so its curves are not drawn over the
earlier run's.

Weights & Biases: a fresh run starts a new W&B run and keeps its id in `output.dir/wandb_run_id`; a run
resumed from a checkpoint continues that W&B run (`WANDB_RUN_ID` overrides both).
"""
from __future__ import annotations

import glob
import os
import uuid
from typing import Any

SCALARS = ("loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_gib",
           "bubble")


class ScalarSinks:
    """`write(record)` logs the known scalars of one step's record under `train/<name>`."""

    def __init__(self, out_dir: str, done_steps: int, tensorboard: bool, wandb: bool, config: dict):
        self._tb = None
        self._wandb = None
        self._earlier: list[str] = []     # an earlier run's event files, removed at this run's first step
        self._id_file: tuple[str, str] | None = None   # (path, id): written at the first step
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = os.path.join(out_dir, "tensorboard")
            if done_steps == 0:
                self._earlier = glob.glob(os.path.join(glob.escape(tb_dir), "*tfevents*"))
            self._tb = SummaryWriter(tb_dir, purge_step=done_steps + 1 if done_steps > 0 else None)
        if wandb:
            import wandb as wandb_module

            run_id = os.environ.get("WANDB_RUN_ID") or self._wandb_id(out_dir, done_steps)
            self._wandb = wandb_module.init(project=os.environ.get("WANDB_PROJECT", "pp"),
                                            name=os.path.basename(os.path.abspath(out_dir)),
                                            dir=out_dir, config=config, resume="allow", id=run_id)

    def _wandb_id(self, out_dir: str, done_steps: int) -> str:
        """The W&B run id: the one kept in output.dir when resuming, a new one for a fresh run."""
        path = os.path.join(out_dir, "wandb_run_id")
        if done_steps > 0:
            try:
                with open(path) as f:
                    kept = f.read().strip()
                if kept:
                    return kept
            except OSError:
                pass
        run_id = uuid.uuid4().hex[:12]
        self._id_file = (path, run_id)
        return run_id

    def _first_step(self) -> None:
        for path in self._earlier:
            try:
                os.remove(path)
            except OSError:
                pass
        self._earlier = []
        if self._id_file is not None:
            path, run_id = self._id_file
            with open(path, "w") as f:
                f.write(run_id + "\n")
            self._id_file = None

    def write(self, record: dict[str, Any]) -> None:
        if self._earlier or self._id_file is not None:
            self._first_step()
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
