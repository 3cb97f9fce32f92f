"""Imported once by `pp.testing`'s fork server: trace and cut a tiny model, so that every rank forked
from it starts with torch.export's one-time set-up done (its lazy imports, dispatch and operator
caches). A forked rank's first `pp.pipeline` then costs what a second one would: on two CPU cores a
GPT of 8 small layers took 16.5 s to trace and cut in a fresh rank and 7.4 s in a rank forked after
this warm-up.

Nothing stays behind that a rank could see: no process group, no model, no thread (tqdm's monitor
thread, which torch.fx's interpreter would start, is kept from starting: a fork server forks from a
single-threaded process). On a machine with a CUDA device it does nothing: torch.export saves and
restores the CUDA RNG state while tracing, which initialises CUDA, and no rank forked from a process
that did can use its GPU ("Cannot re-initialize CUDA in forked subprocess").
"""
from __future__ import annotations

import glob
import os


def _cuda_visible() -> bool:
    """Whether this machine shows a CUDA device, found without initialising CUDA (which even
    `torch.cuda.is_available()` may do at the driver level)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _warm() -> None:
    import torch

    try:
        import tqdm
    except ImportError:  # torch.fx then uses its own stand-in, which starts no thread
        pass
    else:
        tqdm.tqdm.monitor_interval = 0

    from .launcher.config import ModelConfig
    from .launcher.models import build_model
    from .stage.policies import split_by_cost
    from .stage.split import pipeline

    model = build_model(ModelConfig(name="gpt", vocab_size=16, d_model=8, n_layers=2, n_heads=2, seq_len=8), 0)
    pipeline(model, (torch.zeros(2, 8, dtype=torch.long),), split_policy=split_by_cost(2))


try:
    if not _cuda_visible():
        _warm()
except Exception:  # noqa: BLE001 - only a head start: a rank traces as well without it
    pass
