"""How a tensor-parallel parameter is cut, and the two ways between its full and its local tensor.

Checkpoints and gradient checks need the full tensor back (`gather_shard`); loading a full tensor
into a sharded module needs this rank's part (`take_shard`). Both read the same `ParamShard`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pp.comms.collectives import GroupLike, all_gather

__all__ = ["ParamShard", "gather_shard", "take_shard"]


@dataclass(frozen=True)
class ParamShard:
    """A tensor cut along `dim` over the tp group: each of its `blocks` equal blocks (3 for a fused
    qkv weight, else 1) is split into one contiguous part per rank, and a rank holds its part of
    every block, in block order."""

    dim: int
    blocks: int = 1

    def check(self, full: torch.Size | tuple, size: int, what: str) -> None:
        """ValueError naming `what` unless `full` splits into `blocks` x `size` equal parts."""
        n = full[self.dim]
        if n % (self.blocks * size):
            parts = f"{self.blocks} blocks x " if self.blocks > 1 else ""
            raise ValueError(f"{what}: size {n} of dim {self.dim} (shape {tuple(full)}) does not split "
                             f"into {parts}{size} tensor-parallel ranks")


def take_shard(full: torch.Tensor, shard: ParamShard, rank: int, size: int) -> torch.Tensor:
    """This rank's part of `full` (a new contiguous tensor)."""
    shard.check(full.shape, size, "take_shard")
    blocks = full.detach().chunk(shard.blocks, shard.dim)
    k = blocks[0].shape[shard.dim] // size
    parts = [b.narrow(shard.dim, rank * k, k) for b in blocks]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, shard.dim)).contiguous()


def gather_shard(local: torch.Tensor, shard: ParamShard, group: GroupLike = None) -> torch.Tensor:
    """The full tensor from every rank's `local` part over `group` (collective on that group)."""
    gathered = all_gather(local.detach().contiguous(), shard.dim, group)
    if shard.blocks == 1:
        return gathered
    size = gathered.shape[shard.dim] // local.shape[shard.dim]
    pieces = gathered.chunk(size * shard.blocks, shard.dim)     # rank-major: (rank, block)
    return torch.cat([pieces[r * shard.blocks + b] for b in range(shard.blocks) for r in range(size)],
                     shard.dim)
