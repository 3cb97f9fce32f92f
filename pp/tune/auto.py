"""Tune a job config on the ranks of a running job: measure, agree, simulate, choose, and write the
chosen config as YAML that `pp.run` reads. Used by `python -m pp.tune` and by `schedule.name: auto`.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import yaml

from pp.launcher.config import (_GPT_ONLY, _HF_KEYS, ConfigError, JobConfig, is_custom_model, is_given,
                                is_hf_model)
from pp.launcher.validate import check_memory_budget, check_schedule

from .measure import LayerCost, measure_layers
from .plan import GIB, Plan, choose, divisors, rank_plans

MARGIN = 0.1          # share of free memory the default budget leaves unused
MARGIN_MIN = 2**30    # and at least this many bytes


@dataclass
class Tuning:
    """The outcome of tuning: every plan ranked, the chosen one, the budget and the config to run."""

    plans: list[Plan]
    chosen: Plan
    budget_bytes: float
    cfg: JobConfig

    def why(self) -> str:
        """One line: what was chosen and why."""
        p, n = self.chosen, sum(1 for q in self.plans if q.fits)
        return (f"{p.schedule} with {p.microbatches} microbatches, {p.stages_per_rank} stage(s) per rank, split "
                f"at {list(p.points)}: predicted {p.step_s * 1e3:.2f} ms per step (bubble {p.bubble:.1%}), "
                f"peak {p.peak_gib:.3g} GiB per rank; the fastest of {n} plan(s) within the "
                f"{self.budget_bytes / GIB:.3g} GiB budget ({len(self.plans)} simulated)")


def is_auto(cfg: JobConfig) -> bool:
    return isinstance(cfg.schedule.name, str) and cfg.schedule.name.strip().lower() == "auto"


def check_tunable(cfg: JobConfig) -> None:
    """ConfigError for what `schedule.name: auto` cannot tune (checked before any rank starts: every
    rank refuses alike): tp > 1, a bad memory budget, and (with auto) split.points or stages_per_rank,
    which auto chooses itself."""
    check_memory_budget(cfg)
    if cfg.parallel.tp != 1:
        way = "name a schedule instead of 'auto'" if is_auto(cfg) else "run pp.tune with parallel.tp 1"
        raise ConfigError(f"parallel.tp={cfg.parallel.tp}: automatic schedule choice (pp.tune, schedule.name auto) "
                          f"handles tp=1 only; {way}")
    if is_auto(cfg):  # what auto chooses itself is not also given (it would be dropped without a word)
        if cfg.split.points:
            raise ConfigError(f"split.points={cfg.split.points} with schedule.name auto: auto chooses the split "
                              f"itself; remove split.points, or name a schedule to keep them")
        if cfg.schedule.stages_per_rank is not None:
            raise ConfigError(f"schedule.stages_per_rank={cfg.schedule.stages_per_rank} with schedule.name auto: "
                              f"auto chooses the stages per rank itself; remove it, or name a schedule")


def placeholder(cfg: JobConfig) -> JobConfig:
    """A copy of an `auto` config with a plain 1F1B schedule and an automatic split, so every other key
    can be checked before tuning picks the real ones (`check_tunable` first)."""
    check_tunable(cfg)
    out = copy.deepcopy(cfg)
    out.schedule.name, out.schedule.stages_per_rank, out.split.points = "1F1B", None, []
    if not is_given(cfg, "schedule.microbatches"):   # auto chooses it: the default 4 need not divide the batch
        out.schedule.microbatches = 1
    return out


def default_budget(device: torch.device) -> float:
    """Bytes per rank: the device's free memory (CUDA), or this host's available memory shared by its
    local ranks (CPU), less 10 % and at least 1 GiB."""
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
    else:
        free = _host_available() / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(free - max(MARGIN * free, MARGIN_MIN), 0.0)


def _host_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def agree(profile: dict[int, list[LayerCost]]) -> dict[int, list[LayerCost]]:
    """Collective: every rank's measurements combined, field by field the largest (the slowest rank
    sets the pace), so every rank holds the same numbers; sizes some rank could not run are dropped."""
    from pp.launcher import collectives as coll

    rows = coll.all_gather_object(profile) if coll.active() else [profile]
    sizes = set(rows[0])
    for r in rows[1:]:
        sizes &= set(r)
    out = {}
    for b in sorted(sizes):
        layers = rows[0][b]
        for r in rows[1:]:
            layers = [a.worst(c) for a, c in zip(layers, r[b])]
        out[b] = layers
    return out


def tune(cfg: JobConfig, device: torch.device, n_ranks: int, iters: int = 3) -> Tuning:
    """Collective over the job's ranks: measure the layers of `cfg`'s model on `device` at every
    microbatch size that train.batch_size / parallel.dp allows, agree on the numbers, simulate every
    schedule, and choose the fastest plan within schedule.memory_budget_gib (default: `default_budget`,
    the least over the ranks). ConfigError if nothing fits or the config cannot be tuned."""
    from pp.launcher import collectives as coll

    check_tunable(cfg)
    per_replica = cfg.train.batch_size // cfg.parallel.dp
    if cfg.schedule.memory_budget_gib is not None:
        budget = cfg.schedule.memory_budget_gib * GIB
    else:
        mine = default_budget(device)
        budget = min(coll.all_gather_object(mine)) if coll.active() else mine
    counts = [cfg.schedule.microbatches] if is_given(cfg, "schedule.microbatches") else divisors(per_replica)
    sizes = [per_replica // m for m in counts]
    try:
        profile = agree(measure_layers(cfg, device, sizes, iters=iters))
    except (ValueError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot measure model {cfg.model.name!r} for tuning: {first}") from None
    plans = rank_plans(profile, n_ranks, per_replica, budget, precision=cfg.train.precision,
                       zero=cfg.parallel.zero, dp=cfg.parallel.dp, device_type=device.type)
    plans = [p for p in plans if runnable(cfg, p, n_ranks)]
    try:
        chosen = choose(plans, budget)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Tuning(plans, chosen, budget, with_plan(cfg, chosen))


def runnable(cfg: JobConfig, plan: Plan, n_ranks: int) -> bool:
    """Whether `pp.run` takes `cfg` with `plan` on `n_ranks` pipeline ranks (its schedule and split
    checks): a plan it would refuse is never ranked, chosen or written."""
    try:
        check_schedule(with_plan(cfg, plan), n_ranks)
    except ConfigError:
        return False
    return True


def with_plan(cfg: JobConfig, plan: Plan) -> JobConfig:
    """A copy of `cfg` that runs `plan`: its schedule, microbatches, stages per rank and split points."""
    out = copy.deepcopy(cfg)
    out.schedule.name, out.schedule.microbatches = plan.schedule, plan.microbatches
    out.schedule.stages_per_rank = plan.stages_per_rank
    out.split.points = list(plan.points)
    return out


def config_yaml(cfg: JobConfig, header: str = "") -> str:
    """`cfg` as a YAML document `pp.run` reads back to the same config (keys the loader fills itself
    left out)."""
    d = cfg.to_dict()
    m = dict(d["model"])
    if is_custom_model(cfg.model.name):
        m = {"name": m["name"], **({"init_from": m["init_from"]} if m["init_from"] else {}), **m["args"]}
    elif is_hf_model(cfg.model.name):
        m = {k: v for k, v in m.items() if k in _HF_KEYS}
    else:
        m = {k: v for k, v in m.items() if k not in ("args", "config")
             and not (cfg.model.name == "mlp" and k in _GPT_ONLY)}
    d["model"] = m
    d["train"] = {k: v for k, v in d["train"].items() if k != "dtype"}
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + text
