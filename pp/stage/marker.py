"""Split markers: `pipe_split()` inside a model's forward and `SplitPoint` for cuts named by module."""
from __future__ import annotations

import enum

import torch
import torch.fx


@torch.library.custom_op("pp::pipe_split", mutates_args=())
def _pipe_split_op() -> None:
    return None


@_pipe_split_op.register_fake
def _pipe_split_fake() -> None:
    return None


PIPE_SPLIT_OP = torch.ops.pp.pipe_split.default
# Export drops ops whose results are unused; the marker has none, so it must count as a side effect.
torch.fx.node.has_side_effect(PIPE_SPLIT_OP)


def pipe_split() -> None:
    """Mark a cut between two pipeline stages; a no-op when the model runs eagerly."""
    PIPE_SPLIT_OP()


class SplitPoint(enum.Enum):
    """Where a `split_spec` cut goes relative to the named submodule: before it or after it."""

    BEGINNING = 1
    END = 2
