"""The schedules pp knows by name: placement style, stages per rank, backward split and generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pp.schedules import controllable, families, zero_bubble
from pp.schedules.actions import Action
from pp.schedules.actions import Kind
from pp.schedules.lower import lower
from pp.schedules.simulate import DEFAULT_COSTS
from pp.schedules.validate import validate

Generator = Callable[[int, int, int], dict[int, list[Action]]]


def stage_to_rank(style: str, n_stages: int, n_ranks: int) -> list[int]:
    """Placement of stages on ranks: "loop" puts stage s on rank s % p; "v" (n_stages == 2p) puts stages
    r and 2p-1-r on rank r."""
    if not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks must be an integer >= 1, got {n_ranks!r}")
    if style == "loop":
        if not isinstance(n_stages, int) or n_stages < n_ranks or n_stages % n_ranks:
            raise ValueError(f"loop placement needs n_stages to be a multiple of n_ranks={n_ranks}, got {n_stages!r}")
        return families.loop_placement(n_stages, n_ranks)
    if style == "v":
        if n_stages != 2 * n_ranks:
            raise ValueError(f"v placement needs n_stages = 2 * n_ranks = {2 * n_ranks}, got {n_stages!r}")
        return families.v_placement(n_stages, n_ranks)
    raise ValueError(f"unknown placement style {style!r}: expected 'loop' or 'v'")


@dataclass(frozen=True)
class ScheduleSpec:
    """What a schedule needs: its placement `style`, `stages_per_rank` (None: any multiple of p; the
    multi-stage schedules also run with one stage per rank, as torch's do),
    whether it splits the backward into I and W (`split_backward`), and its compute-order generator."""

    name: str
    style: str
    stages_per_rank: int | None
    split_backward: bool
    generate: Generator

    def n_stages(self, n_ranks: int, stages_per_rank: int | None = None) -> int:
        """The stage count for `n_ranks`; `stages_per_rank` picks v where the schedule allows several."""
        if stages_per_rank is None:
            stages_per_rank = self.stages_per_rank or 2
        if not isinstance(stages_per_rank, int) or stages_per_rank < 1:
            raise ValueError(f"stages_per_rank must be an integer >= 1, got {stages_per_rank!r}")
        if self.stages_per_rank is not None and stages_per_rank != self.stages_per_rank:
            raise ValueError(f"{self.name} runs exactly {self.stages_per_rank} stage(s) "
                             f"per rank, got stages_per_rank={stages_per_rank}")
        return stages_per_rank * n_ranks

    def placement(self, n_stages: int, n_ranks: int) -> list[int]:
        return stage_to_rank(self.style, n_stages, n_ranks)


SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        ScheduleSpec("GPipe", "loop", 1, False, families.gpipe),
        ScheduleSpec("1F1B", "loop", 1, False, families.one_f_one_b),
        ScheduleSpec("Interleaved1F1B", "loop", None, False, families.interleaved_1f1b),
        ScheduleSpec("LoopedBFS", "loop", None, False, families.looped_bfs),
        ScheduleSpec("InterleavedZeroBubble", "loop", None, True, zero_bubble.interleaved_zero_bubble),
        ScheduleSpec("ZBVZeroBubble", "v", 2, True, zero_bubble.zbv_zero_bubble),
        # DualPipeV uses B inside its overlapped pairs and I/W elsewhere: stages must support both.
        ScheduleSpec("DualPipeV", "v", 2, True, families.dualpipe_v),
        ScheduleSpec("ZBVHalf", "v", 2, True, controllable.zbv_half),
        ScheduleSpec("ZBVMin", "v", 2, True, controllable.zbv_min),
    )
}


def get_spec(name: str) -> ScheduleSpec:
    """The spec of a schedule by name (case-insensitive); ValueError naming the valid ones otherwise."""
    for key, spec in SCHEDULES.items():
        if isinstance(name, str) and key.lower() == name.strip().lower():
            return spec
    raise ValueError(f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULES)}")


def build_lists(
    name: str,
    n_ranks: int,
    n_microbatches: int,
    stages_per_rank: int | None = None,
    edges: Mapping[int, Sequence[int]] | None = None,
    costs: Mapping[Kind, float] | None = DEFAULT_COSTS,
) -> tuple[list[int], dict[int, list[Action]]]:
    """Generate, lower (timed for `costs`; None: plain lock-step) and validate a named schedule;
    return (stage_to_rank, lowered lists per rank)."""
    spec = get_spec(name)
    n_stages = spec.n_stages(n_ranks, stages_per_rank)
    placement = spec.placement(n_stages, n_ranks)
    compute = spec.generate(n_stages, n_ranks, n_microbatches)
    lists = lower(compute, placement, n_microbatches, edges, costs)
    validate(lists, placement, n_microbatches, edges)
    return placement, lists
