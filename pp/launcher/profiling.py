"""`output.profile_step`: one training step under torch.profiler, a Chrome trace per rank."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def trace_path(out_dir: str, rank: int) -> str:
    """Where rank `rank` writes its profile: `<output.dir>/profile/rank<rank>.json`."""
    return os.path.join(out_dir, "profile", f"rank{rank}.json")


@contextlib.contextmanager
def profiled(enabled: bool, out_dir: str, rank: int, device: torch.device) -> Iterator[None]:
    """Run the body under `torch.profiler.profile` (host activity, and the device's on a GPU) when
    `enabled`, then export the Chrome trace to `trace_path(out_dir, rank)` (open it in Perfetto or
    chrome://tracing). Nothing happens when `enabled` is False. Record shapes and stacks are off, so the
    profiled step runs close to an ordinary one."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        yield
    path = trace_path(out_dir, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prof.export_chrome_trace(path)
