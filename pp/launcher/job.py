"""Everything decided before any process-group work: the checked config, the model and its split.

Every rank runs `prepare` alike (same config, same seed, same deterministic splitter), so a problem
found here is found by all ranks at once and reported once, by rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pp import Pipe, SplitPoint, pipeline, split_by_cost, split_into_equal_size

from .config import ConfigError, JobConfig
from .models import build_model
from .validate import DTYPES, Layout, check_split_points, validate


@dataclass
class Job:
    cfg: JobConfig
    layout: Layout
    pipe: Pipe
    n_params: int

    @property
    def microbatch_size(self) -> int:
        return self.cfg.train.batch_size // self.cfg.schedule.microbatches


def prepare(cfg: JobConfig, world_size: int) -> Job:
    """Validate `cfg` for `world_size` ranks, build the model and cut it; ConfigError on any bad value."""
    layout = validate(cfg, world_size)
    model = build_model(cfg.model, cfg.train.seed, DTYPES[cfg.train.dtype])
    n_params = sum(p.numel() for p in model.parameters())
    pipe = split_model(model, cfg, layout)
    return Job(cfg, layout, pipe, n_params)


def example_microbatch(cfg: JobConfig) -> torch.Tensor:
    """Token ids shaped like one microbatch, for tracing."""
    mb = cfg.train.batch_size // cfg.schedule.microbatches
    return torch.zeros((mb, cfg.model.seq_len), dtype=torch.long)


def split_model(model: nn.Module, cfg: JobConfig, layout: Layout) -> Pipe:
    """Cut `model` into `layout.n_stages` stages at the configured points, or balanced automatically."""
    kwargs: dict = {}
    if cfg.split.points:
        check_split_points(cfg.split.points, model)
        kwargs["split_spec"] = {p: SplitPoint.BEGINNING for p in cfg.split.points}
        key = "split.points"
    else:
        policy = split_by_cost if cfg.split.policy == "cost" else split_into_equal_size
        kwargs["split_policy"] = policy(layout.n_stages)
        key = f"parallel.pp={layout.pp} ({layout.n_stages} stages)"
    try:
        pipe = pipeline(model, mb_args=(example_microbatch(cfg),), **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot split model {cfg.model.name!r} for {key}: {first}") from None
    if pipe.num_stages != layout.n_stages:
        raise ConfigError(f"split.points={cfg.split.points} cut the model into {pipe.num_stages} stages, "
                          f"but {layout.n_stages} are needed")
    return pipe
