"""The few control collectives the launcher needs (barrier, object gather), in one place.

pp.comms owns P2P and tensor collectives (the per-step stats go through it); these are once-per-job
calls on the default group and degrade to no-ops in a single process, so the same code runs in `load_unsplit`.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj`, by rank."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
