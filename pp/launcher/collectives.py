"""The few control collectives the launcher needs (barrier, object gather), named as the launcher uses them.

They live in pp.comms (the only code that talks to torch.distributed) and degrade to no-ops in a single
process, so the same code runs in `load_unsplit`.
"""
from __future__ import annotations

from pp.comms.backend import all_gather_object, barrier
from pp.comms.backend import get_rank as rank
from pp.comms.backend import get_world_size as world_size
from pp.comms.backend import is_initialized as active

__all__ = ["active", "all_gather_object", "barrier", "rank", "world_size"]
