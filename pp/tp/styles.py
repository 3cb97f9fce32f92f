"""Tensor-parallel styles for linear layers, and the translation of torch's own style objects."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["ColwiseParallel", "LinearPlan", "RowwiseParallel", "normalize_plan"]


@dataclass(frozen=True)
class ColwiseParallel:
    """Shard an nn.Linear's weight on dim 0 (out features) and its bias; the input is replicated.

    The output stays sharded on its last dim (so elementwise ops and a following row-parallel linear
    need no communication) unless `gather_output`, which all-gathers it right away.
    """

    gather_output: bool = False


@dataclass(frozen=True)
class RowwiseParallel:
    """Shard an nn.Linear's weight on dim 1 (in features); the bias stays whole, added once.

    The partial products are all-reduced (output replicated), or, with `scatter_dim` set, reduce-
    scattered along that dim (sequence parallelism; must not be the last dim).
    """

    scatter_dim: Optional[int] = None


@dataclass(frozen=True)
class LinearPlan:
    """What the graph rewrite needs to know about one module: `kind` is "col" or "row";
    `out_dim` is the dim its output stays sharded on (None: replicated; -1: last dim)."""

    kind: str
    out_dim: Optional[int]


def normalize_plan(parallel_strategies: Mapping[str, Any]) -> dict[str, LinearPlan]:
    """Check a {module FQN: style} mapping and translate every style to a `LinearPlan`.

    A style is an instance of pp.tp's or torch's ColwiseParallel/RowwiseParallel, or one of those
    classes itself (meaning its defaults: `{"fc": ColwiseParallel}`). Raises TypeError for anything
    else, ValueError for a bad key or an unsupported torch layout."""
    if not isinstance(parallel_strategies, Mapping):
        raise TypeError(f"parallel_strategies must map module names to styles, "
                        f"got {type(parallel_strategies).__name__}")
    plans: dict[str, LinearPlan] = {}
    for fqn, style in parallel_strategies.items():
        if not isinstance(fqn, str) or not fqn:
            raise ValueError(f"parallel_strategies keys must be module names like 'mlp.0', got {fqn!r}")
        plans[fqn] = _to_plan(fqn, style)
    return plans


def _to_plan(fqn: str, style: Any) -> LinearPlan:
    if isinstance(style, type):  # the class itself, as torch's own tests write plans: its defaults
        if not (issubclass(style, (ColwiseParallel, RowwiseParallel)) or _is_torch_style(style)):
            raise TypeError(f"{fqn}: style must be pp.tp.ColwiseParallel/RowwiseParallel or torch's "
                            f"ColwiseParallel/RowwiseParallel (a class or an instance), got the class "
                            f"{style.__name__}")
        style = style()
    if isinstance(style, ColwiseParallel):
        return LinearPlan("col", None if style.gather_output else -1)
    if isinstance(style, RowwiseParallel):
        if style.scatter_dim is not None and not isinstance(style.scatter_dim, int):
            raise ValueError(f"{fqn}: RowwiseParallel.scatter_dim must be an int or None, "
                             f"got {style.scatter_dim!r}")
        return LinearPlan("row", style.scatter_dim)
    torch_plan = _from_torch_style(fqn, style)
    if torch_plan is not None:
        return torch_plan
    raise TypeError(f"{fqn}: style must be pp.tp.ColwiseParallel/RowwiseParallel or torch's "
                    f"ColwiseParallel/RowwiseParallel (a class or an instance), got {type(style).__name__}")


def _is_torch_style(cls: type) -> bool:
    """Whether `cls` is (a subclass of) torch.distributed.tensor.parallel's Colwise/RowwiseParallel."""
    try:
        from torch.distributed.tensor.parallel.style import ColwiseParallel as TorchCol
        from torch.distributed.tensor.parallel.style import RowwiseParallel as TorchRow
    except ImportError:  # torch built without distributed
        return False
    return issubclass(cls, (TorchCol, TorchRow))


def _from_torch_style(fqn: str, style: Any) -> Optional[LinearPlan]:
    """Translate torch.distributed.tensor.parallel's Colwise/RowwiseParallel by their output layouts.

    Input layouts are not needed: the rewrite sees in the graph how each input is laid out.
    """
    try:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel.style import ColwiseParallel as TorchCol
        from torch.distributed.tensor.parallel.style import RowwiseParallel as TorchRow
    except ImportError:  # torch built without distributed
        return None
    if not isinstance(style, (TorchCol, TorchRow)):
        return None
    kind = "col" if isinstance(style, TorchCol) else "row"
    layouts = getattr(style, "output_layouts", None) or ()
    layout = layouts[0] if len(layouts) == 1 else None
    if isinstance(layout, Replicate):
        return LinearPlan(kind, None)
    if isinstance(layout, Shard) and kind == "col" and layout.dim == -1:
        return LinearPlan(kind, -1)
    if isinstance(layout, Shard) and kind == "row":
        return LinearPlan(kind, layout.dim)
    raise ValueError(f"{fqn}: torch {type(style).__name__} with output_layouts={layouts!r} is not "
                     f"supported; use Shard(-1) or Replicate() (column) or Replicate() / Shard(d) (row)")
