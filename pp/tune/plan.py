"""Choose a schedule from measured layer costs: every schedule x microbatch count x stages per rank, each
with a cost-balanced split, simulated for its step time, bubble and peak memory per rank.

Pure Python on the measured numbers: every rank that holds the same numbers picks the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from pp.schedules.actions import Action, Kind
from pp.stage.policies import balanced_starts

from .measure import LayerCost

GIB = float(2**30)
# Estimated transfer speed between neighbouring pipeline ranks: (bytes per second, seconds per message).
LINKS: dict[str, tuple[float, float]] = {"cuda": (100e9, 20e-6), "cpu": (2e9, 100e-6)}


@dataclass(frozen=True)
class Plan:
    """One simulated configuration: schedule, microbatches, stages per rank, the split (`points`, module
    names where stages 1.. begin), predicted step seconds, bubble and peak bytes per rank."""

    schedule: str
    microbatches: int
    stages_per_rank: int
    points: tuple[str, ...]
    step_s: float
    bubble: float
    peak_bytes: tuple[int, ...]
    fits: bool = True
    stage_costs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def peak_gib(self) -> float:
        return max(self.peak_bytes) / GIB


def balanced_split(layers: Sequence[LayerCost], n_stages: int, split_backward: bool) -> list[int]:
    """Start index (into `layers`) of each of `n_stages` stages, balancing forward + backward time; a
    layer without a `cut` name stays with the layer before it. ValueError if there are too few cuts."""
    units: list[list[int]] = []
    for i, layer in enumerate(layers):
        if units and layer.cut is None:
            units[-1].append(i)
        else:
            units.append([i])
    if n_stages > len(units):
        raise ValueError(f"{n_stages} stages need {n_stages} layers a stage may begin at; the model has "
                         f"{len(units)}")

    def cost(i: int) -> float:
        c = layers[i]
        return c.forward_s + (c.input_grad_s + c.weight_grad_s if split_backward else c.backward_s)

    starts = balanced_starts([max(sum(cost(i) for i in u), 1e-12) for u in units], n_stages)
    return [units[k][0] for k in starts]


def param_bytes_per_element(precision: str, zero: int = 0, dp: int = 1) -> float:
    """Bytes per parameter of weights + gradients + AdamW state: fp32 and bf16-mixed keep all in float32
    (4 + 4 + 8), bf16 all in bfloat16 (2 + 2 + 4); ZeRO divides the sharded parts over `dp` replicas."""
    w, g, o = (2.0, 2.0, 4.0) if precision == "bf16" else (4.0, 4.0, 8.0)
    if dp > 1 and zero >= 1:
        o /= dp
    if dp > 1 and zero >= 2:
        g /= dp
    if dp > 1 and zero >= 3:
        w /= dp
    return w + g + o


def activation_peaks(lists: Mapping[int, Sequence[Action]], held: Mapping[int, int],
                     after_i: Mapping[int, int]) -> dict[int, int]:
    """Peak bytes of in-flight activations per rank, counted along each rank's action list: F adds the
    stage's `held` bytes, B frees them, I frees all but `after_i`, W frees the rest."""
    peaks = {}
    for rank, actions in lists.items():
        now = peak = 0
        for a in actions:
            if a.kind == Kind.F:
                now += held[a.stage]
            elif a.kind == Kind.B:
                now -= held[a.stage]
            elif a.kind == Kind.I:
                now -= held[a.stage] - after_i[a.stage]
            elif a.kind == Kind.W:
                now -= after_i[a.stage]
            peak = max(peak, now)
        peaks[rank] = peak
    return peaks


def simulate_plan(name: str, layers: Sequence[LayerCost], n_ranks: int, microbatches: int,
                  stages_per_rank: int, *, precision: str = "fp32", zero: int = 0, dp: int = 1,
                  device_type: str = "cpu") -> Plan:
    """Simulate schedule `name` with `microbatches` microbatches of the measured `layers` (one
    microbatch's costs) cut into a cost-balanced split; ValueError where the schedule cannot run so."""
    from pp.schedules.registry import build_lists, get_spec
    from pp.schedules.simulate import bubble_fraction, simulate

    spec = get_spec(name)
    n_stages = spec.n_stages(n_ranks, stages_per_rank)
    starts = balanced_split(layers, n_stages, spec.split_backward)
    placement, lists = build_lists(spec.name, n_ranks, microbatches, stages_per_rank)
    bounds = starts + [len(layers)]
    groups = [layers[bounds[k]:bounds[k + 1]] for k in range(n_stages)]
    empty = [s for s, g in enumerate(groups) if not sum(c.params for c in g)]
    if empty:   # pp.run refuses a stage its optimizer would have nothing to train in
        raise ValueError(f"stage {empty[0]} of this split holds no trainable parameter")
    costs = {s: {Kind.F: sum(c.forward_s for c in g), Kind.B: sum(c.backward_s for c in g),
                 Kind.I: sum(c.input_grad_s for c in g), Kind.W: sum(c.weight_grad_s for c in g)}
             for s, g in enumerate(groups)}
    bw, latency = LINKS.get(device_type, LINKS["cpu"])
    boundary = max((g[-1].out_bytes for g in groups[:-1]), default=0)
    comm = latency + boundary / bw if n_ranks > 1 else 0.0
    events = simulate(lists, placement, comm_cost=comm, stage_costs=costs)
    makespan = max(e.end for e in events) - min(e.start for e in events)
    optimizer = max(sum(c.optimizer_s for s, g in enumerate(groups) if placement[s] == r for c in g)
                    for r in range(n_ranks))
    held = {s: sum(c.act_bytes for c in g) for s, g in enumerate(groups)}
    after_i = {s: sum(c.act_after_i_bytes for c in g) for s, g in enumerate(groups)}
    acts = activation_peaks(lists, held, after_i)
    per_param = param_bytes_per_element(precision, zero, dp)
    peaks = []
    for r in range(n_ranks):
        mine = [g for s, g in enumerate(groups) if placement[s] == r]
        static = per_param * sum(c.params for g in mine for c in g)
        # a received input and a gradient being sent: one boundary tensor each, beside the activations
        peaks.append(int(static + acts.get(r, 0) + 2 * boundary))
    points = tuple(layers[i].cut for i in starts[1:])
    return Plan(spec.name, microbatches, stages_per_rank, points, makespan + optimizer,
                bubble_fraction(events, n_ranks), tuple(peaks), stage_costs=costs)


def stage_counts(name: str, n_ranks: int, n_cuts: int) -> list[int]:
    """Stages per rank worth trying for schedule `name`: what it needs, or 1, 2, 4, ... while there are
    layers enough."""
    from pp.schedules.registry import get_spec

    spec = get_spec(name)
    if spec.stages_per_rank is not None:
        return [spec.stages_per_rank] if spec.stages_per_rank * n_ranks <= n_cuts else []
    out, v = [], 1
    while v * n_ranks <= n_cuts:
        out.append(v)
        v *= 2
    return out


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_plans(profile: Mapping[int, Sequence[LayerCost]], n_ranks: int, per_replica_batch: int,
               budget_bytes: float, *, precision: str = "fp32", zero: int = 0, dp: int = 1,
               device_type: str = "cpu", schedules: Sequence[str] | None = None) -> list[Plan]:
    """Every runnable plan for the measured `profile` ({microbatch size: layer costs}), fastest first,
    those within `budget_bytes` (peak per rank) before those over it."""
    from pp.schedules.registry import SCHEDULES

    plans = []
    for m in divisors(per_replica_batch):
        layers = profile.get(per_replica_batch // m)
        if not layers:
            continue
        n_cuts = 1 + sum(1 for c in layers[1:] if c.cut is not None)
        for name in schedules or list(SCHEDULES):
            for v in stage_counts(name, n_ranks, n_cuts):
                try:
                    plan = simulate_plan(name, layers, n_ranks, m, v, precision=precision, zero=zero, dp=dp,
                                         device_type=device_type)
                except ValueError:
                    continue  # this schedule cannot run with these microbatches / stages
                plans.append(Plan(**{**plan.__dict__, "fits": max(plan.peak_bytes) <= budget_bytes}))
    plans.sort(key=lambda p: (not p.fits, p.step_s, p.peak_gib, p.schedule, p.microbatches))
    return plans


def choose(plans: Sequence[Plan], budget_bytes: float) -> Plan:
    """The fastest plan within the budget; ValueError naming the budget and the smallest estimate if
    none fits (or there is no plan at all)."""
    if not plans:
        raise ValueError("no schedule can run this model on these ranks (too few layers or microbatches)")
    fitting = [p for p in plans if p.fits]
    if fitting:
        return fitting[0]
    least = min(plans, key=lambda p: max(p.peak_bytes))
    raise ValueError(f"no configuration fits schedule.memory_budget_gib={budget_bytes / GIB:.3g}: the smallest "
                     f"estimate is {least.peak_gib:.3g} GiB per rank ({least.schedule}, {least.microbatches} "
                     f"microbatches); raise the budget or use more ranks")


def ranking_table(plans: Sequence[Plan], budget_bytes: float, limit: int = 20) -> str:
    """The ranking as a text table, fastest fitting plan first."""
    head = f"{'#':>3}  {'schedule':<22}{'mb':>4}{'v':>3}  {'step ms':>9}  {'bubble':>6}  {'peak GiB/rank':>13}  fits"
    lines = [head, "-" * len(head)]
    for i, p in enumerate(plans[:limit], 1):
        lines.append(f"{i:>3}  {p.schedule:<22}{p.microbatches:>4}{p.stages_per_rank:>3}  {p.step_s * 1e3:>9.2f}  "
                     f"{p.bubble:>6.1%}  {p.peak_gib:>13.4g}  {'yes' if p.fits else 'no'}")
    if len(plans) > limit:
        lines.append(f"... {len(plans) - limit} more")
    lines.append(f"budget: {budget_bytes / GIB:.4g} GiB per rank; mb: microbatches, v: stages per rank")
    return "\n".join(lines)
