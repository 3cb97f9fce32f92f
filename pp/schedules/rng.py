"""Random streams per pipeline rank during a step.

Ranks seeded alike (as they must be to build the same model) would draw the same random numbers in
their stages: the dropout of stage 1 on rank 1 would repeat, microbatch by microbatch, the mask that stage
0 drew on rank 0 (perfectly correlated dropout, reported against other pipeline libraries). In the
unsplit model the two dropouts draw different masks. So each step runs with the default generators
seeded from one draw of the caller's stream (the same on every rank seeded alike, so runs repeat) plus
the pipeline rank, and the caller's streams are restored after it (Megatron-Core offsets its seeds by
pipeline rank for the same reason). Tensor-parallel ranks of one pipeline rank draw alike, as their
replicated regions must; one process (a single rank) is left as it is.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_RANK_STRIDE = 1_000_003   # a prime: rank offsets never meet another step's draw by accident


@contextlib.contextmanager
def rank_streams(rank: int, n_ranks: int, device: torch.device) -> Iterator[None]:
    """Within: the CPU generator and `device`'s seeded for this pipeline rank; after: the caller's
    generators as they were, advanced by one draw."""
    if n_ranks == 1:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, (1,)).item()) + _RANK_STRIDE * rank   # CPU: no device sync
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[device.index if device.index is not None else
                                          torch.cuda.current_device()].manual_seed(seed)
        yield
