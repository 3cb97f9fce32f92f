"""Every schedule, traced and manual stages, against the unsplit model on this machine's devices.

Run under torchrun (e.g. 4 GPUs: NCCL); prints one line per schedule from rank 0 and exits non-zero on
any mismatch. `python -m torch.distributed.run --nproc-per-node 4 scripts/check_schedules.py`
With `--cuda-graphs` (GPUs): the stages replay as CUDA graphs from step 2 (captured after step 1).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))           # pp, without installing it
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pp.comms.backend import init_process_group_from_env  # noqa: E402
from pp.schedules.registry import SCHEDULES  # noqa: E402
from runtime_models import run_schedule_against_reference  # noqa: E402


def main() -> int:
    graphs = "--cuda-graphs" in sys.argv[1:]
    rank, world, device = init_process_group_from_env()
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = 0
    for traced in (True, False):
        for name in SCHEDULES:
            for n_mb in ((2 * world, 4 * world) if graphs else (world, 2 * world)):
                t0 = time.perf_counter()
                try:
                    run_schedule_against_reference(rank, world, name, n_mb, traced, device=str(device),
                                                   steps=3 if graphs else 2, cuda_graphs=graphs)
                    verdict = "match"
                except Exception as e:  # report and go on: one line per case
                    verdict = f"MISMATCH {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    failures += 1
                verdicts: list = [None] * world
                dist.all_gather_object(verdicts, verdict)
                bad = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v != "match"]
                if rank == 0:
                    print(f"{name:22s} {'traced' if traced else 'manual'} microbatches={n_mb:2d} "
                          f"ranks={world} backend={dist.get_backend()} {device.type}"
                          f"{' cuda-graphs' if graphs else ''}: "
                          f"{'losses and grads match the unsplit model' if not bad else 'FAILED on ' + bad[0]} "
                          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
