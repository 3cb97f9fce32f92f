"""What torch.distributed.pipelining's schedules expose beyond running a step: `pipeline_order`, and the
rule for which keywords step()/eval() accept."""
from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..stage.compiled import inner_module
from .actions import Action, Compound, Kind
from .lower import compute_ticks

if TYPE_CHECKING:
    from ..stage.runtime import PipelineStage


def pipeline_order(compute: Mapping[int, Sequence[Action]], rows: Mapping[int, Sequence[Any]] | None,
                   stage_to_rank: list[int], edges) -> dict[int, list[Any]]:
    """torch's `pipeline_order`: rank -> its compute actions in order, None where it idles (a bubble).

    From a file or rows the user gave: the cells as written (compound cells kept whole, sends and
    receives left out). Generated schedules: one entry per unit-time tick of the lock-step run.
    """
    if rows is not None:
        return {r: [c for c in cells if c is None or c.is_compute] for r, cells in sorted(rows.items())}
    order: dict[int, list[Any]] = {}
    for r, ticks in compute_ticks(compute, stage_to_rank, edges).items():
        out: list[Any] = []
        for a, t in zip(compute[r], ticks):
            out.extend([None] * (t - len(out)))
            out.append(a)
        order[r] = out
    return dict(sorted(order.items()))


def check_model_keywords(stages: dict[int, PipelineStage], kwargs: dict) -> None:
    """TypeError for a keyword of step()/eval() that is not a parameter of the model's forward.

    The rule: a traced pipeline knows the model's forward signature on every rank; manual stages know it
    only on the first stage's rank, where a keyword must be taken by the forward of one of the rank's
    stages (torch gives a rank's step keywords to each of its stages); other ranks pass each stage the
    keywords it takes and leave the check to the first (its refusal reaches them through the step's
    opening all-reduce). A forward taking **kwargs accepts all.
    """
    if not kwargs:
        return
    stage = next(iter(stages.values()))
    if stage.pipe_info is not None:
        sigs = [stage.pipe_info.input_binder.signature]
        if sigs[0] is None:
            return
    elif 0 in stages:
        try:
            sigs = [inspect.signature(inner_module(s.submod).forward) for s in stages.values()]
        except (TypeError, ValueError):
            return
    else:
        return
    if any(p.kind == p.VAR_KEYWORD for sig in sigs for p in sig.parameters.values()):
        return
    names = [n for sig in sigs for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = list(dict.fromkeys(names))
    unknown = sorted(k for k in kwargs if k not in names)
    if unknown:
        raise TypeError(f"step()/eval() got unknown keyword(s) {unknown}: they take target=, losses=, "
                        f"return_outputs=, loss_kwargs= and the model's forward parameters {names}")


def first_backward(order: Mapping[int, Sequence[Any]]) -> str | None:
    """The first backward cell (B, I or W) of lists the user wrote, as "rank r's 0B0"; None if none."""
    for r, cells in sorted(order.items()):
        for c in cells:
            for a in (c.sub_actions if isinstance(c, Compound) else (c,)):
                if isinstance(a, Action) and a.kind in (Kind.B, Kind.I, Kind.W):
                    return f"rank {r}'s {a}"
    return None


def warn_forward_only(backward: str | None, target_here: bool) -> bool:
    """Warn (and return True) where step() without a loss_fn would silently compute no gradients: the
    action lists the user wrote hold a backward cell (`backward`, from `first_backward`), or the rank
    holding the last stage passed a target. step() runs forward only then, as torch's does."""
    if backward is None and not target_here:
        return False
    what = (f"the action lists hold backward actions ({backward})" if backward
            else "step() got a target on the rank holding the last stage")
    warnings.warn(f"{what}, but the schedule has no loss_fn: step() runs forward only and computes no "
                  f"gradients (as torch's schedules do); pass loss_fn= to the schedule to train",
                  stacklevel=3)
    return True
