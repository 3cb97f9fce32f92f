"""How a tensor-parallel parameter is cut, and the two ways between its full and its local tensor.

Checkpoints and gradient checks need the full tensor back (`gather_shard`); loading a full tensor
into a sharded module needs this rank's part (`take_shard`). Both read the same `ParamShard`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pp.comms.collectives import GroupLike, all_gather, group_size

__all__ = ["ParamShard", "chunk_bounds", "gather_shard", "take_shard"]


def chunk_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s part when `n` things are split over `size` ranks as `torch.chunk`
    and DTensor's `Shard` split them: ceil(n / size) each in rank order, the last parts short or empty
    (5 over 2: 3 + 2; 5 over 4: 2 + 2 + 1 + 0)."""
    step = -(-n // size)
    start = min(rank * step, n)
    return start, min(start + step, n)


@dataclass(frozen=True)
class ParamShard:
    """A tensor cut along `dim` over the tp group: each of its `blocks` equal blocks (3 for a fused
    qkv weight, else 1) is split into one contiguous part per rank as `chunk_bounds` says (unevenly
    where the block's size does not divide), and a rank holds its part of every block, in block
    order. `length` is the whole tensor's size along `dim` (None: local size x group size)."""

    dim: int
    blocks: int = 1
    length: Optional[int] = None

    def check(self, full: torch.Size | tuple, size: int, what: str) -> None:
        """ValueError naming `what` unless `full` splits into `blocks` equal blocks, each of which
        splits evenly over `size` ranks where there are several blocks (their parts must match)."""
        n = full[self.dim]
        if n % self.blocks or (self.blocks > 1 and n % (self.blocks * size)):
            parts = f"{self.blocks} blocks x " if self.blocks > 1 else ""
            raise ValueError(f"{what}: size {n} of dim {self.dim} (shape {tuple(full)}) does not split "
                             f"into {parts}{size} tensor-parallel ranks")

    def whole(self, local: int, size: int) -> int:
        """The whole tensor's size along `dim`, from this rank's `local` size there."""
        return self.length if self.length is not None else local * size


def take_shard(full: torch.Tensor, shard: ParamShard, rank: int, size: int) -> torch.Tensor:
    """This rank's part of `full` (a new contiguous tensor)."""
    shard.check(full.shape, size, "take_shard")
    blocks = full.detach().chunk(shard.blocks, shard.dim)
    parts = []
    for b in blocks:
        start, stop = chunk_bounds(b.shape[shard.dim], size, rank)
        parts.append(b.narrow(shard.dim, start, stop - start))
    if len(parts) > 1:
        return torch.cat(parts, shard.dim)
    # a copy even where the part is already contiguous (a row block): a view would keep the whole
    # tensor's storage alive on every rank, and ZeRO 3, which frees and re-allocates a parameter's
    # storage, would write past the end of a storage it shares from an offset
    return parts[0].clone(memory_format=torch.contiguous_format)


def gather_shard(local: torch.Tensor, shard: ParamShard, group: GroupLike = None) -> torch.Tensor:
    """The full tensor from every rank's `local` part over `group` (collective on that group).
    Uneven parts are padded to the largest for the one all-gather, and the padding dropped."""
    size = group_size(group)
    dim, k = shard.dim, shard.blocks
    block = shard.whole(local.shape[dim], size) // k
    step = -(-block // size)
    pieces = list(local.detach().chunk(k, dim)) if k > 1 else [local.detach()]
    padded = [torch.cat([p, p.new_zeros((*p.shape[:dim], step - p.shape[dim], *p.shape[dim + 1:]))], dim)
              if p.shape[dim] < step else p for p in pieces]
    gathered = all_gather((padded[0] if k == 1 else torch.cat(padded, dim)).contiguous(), dim, group)
    parts = gathered.chunk(size * k, dim)     # rank-major: (rank, block), each `step` long
    return torch.cat([torch.cat([parts[r * k + b] for r in range(size)], dim).narrow(dim, 0, block)
                      for b in range(k)], dim)
