"""Everything decided before any process-group work: the checked config, the model and its split.

Every rank runs `prepare` alike (same config, same seed, same deterministic splitter), so a problem
found here is found by all ranks at once and reported once, by rank 0.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
import torch.nn as nn

from pp import Pipe, SplitPoint, pipeline, split_by_cost, split_into_equal_size
from pp.parallel.precision import cast_module
from pp.tp.styles import normalize_plan

from .config import ConfigError, JobConfig
from .metrics import count
from .models import build_model, is_hf_model
from .validate import Layout, check_split_points, validate


@dataclass
class Job:
    cfg: JobConfig
    layout: Layout
    pipe: Pipe
    n_params: int
    tp_plan: dict | None = None   # {module name: style} when parallel.tp > 1
    tuned: dict | None = None     # schedule.name auto: what pp.tune chose and its predicted step time

    @property
    def microbatch_size(self) -> int:
        return self.cfg.train.batch_size // (self.cfg.parallel.dp * self.cfg.schedule.microbatches)


def prepare(cfg: JobConfig, world_size: int) -> Job:
    """Validate `cfg` for `world_size` ranks, build the model and cut it; ConfigError on any bad value."""
    layout = validate(cfg, world_size)
    # Built-in models are built and cut on the meta device: each rank later allocates only its stages.
    model = build_model(cfg.model, cfg.train.seed, device="meta")
    if cfg.model.init_from and not will_resume(cfg):
        check_init_from(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params == 0:
        raise ConfigError(f"model.name={cfg.model.name!r} has no parameters: there is nothing to train")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.name={cfg.model.name!r} has no trainable parameters (every one has "
                          f"requires_grad=False): there is nothing to train")
    tp_plan = tp_plan_for(model, cfg)
    if cfg.train.precision == "bf16":   # traced in bf16, as the unsplit model.to(torch.bfloat16) runs: the
        cast_module(model, "bf16")      # graph's own dtype casts (a rotary table's .to(x.dtype)) are bf16 then
    pipe = split_model(model, cfg, layout)
    check_logits(pipe, cfg)
    return Job(cfg, layout, pipe, n_params, tp_plan)


def check_logits(pipe: Pipe, cfg: JobConfig) -> None:
    """ConfigError unless the model returns one floating tensor of logits shaped (microbatch, seq_len, V)
    (or a tuple of it and a 0-dim floating auxiliary loss, which the training loss adds)
    with V >= vocab_size for the traced microbatch (a vocabulary padded to a round size, as Megatron pads
    it, is fine): the loss reads a target id as an index into the last dimension, so narrower logits
    would fail in the first step (an IndexError) and logits of another shape would be misread. Read from
    the traced graph (no forward runs); skipped where the graph holds no shapes."""
    gm = pipe.get_stage_module(pipe.num_stages - 1)
    graph = getattr(gm, "graph", None)
    if graph is None:
        return
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in outs]   # a constant as itself
    if any(v is None and isinstance(a, torch.fx.Node) for v, a in zip(vals, outs)):
        return
    mb = example_microbatch(cfg).shape[0]
    want = (mb, cfg.model.seq_len, cfg.model.vocab_size)
    got = [f"{str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}" if isinstance(v, torch.Tensor)
           else type(v).__name__ for v in vals]
    spec = pipe._info.out_spec   # a tensor, or a tuple (logits, aux_loss): not a list or dict holding one
    pair = (spec == pytree.tree_flatten((0, 0))[1] and len(vals) == 2 and isinstance(vals[1], torch.Tensor)
            and vals[1].is_floating_point() and vals[1].dim() == 0)   # exactly (logits, aux): not nested
    logits = vals[0] if len(vals) == 1 and spec.is_leaf() or pair else None
    if (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() == 3
            and tuple(logits.shape[:2]) == want[:2] and logits.shape[2] >= want[2]):
        return
    shown = got[0] if len(got) == 1 and spec.is_leaf() else f"a {spec.type.__name__} of {', '.join(got)}"
    raise ConfigError(f"model {cfg.model.name!r} returns {shown} for a microbatch of token ids shaped "
                      f"{tuple(want[:2])}; pp.run trains a language model and needs one floating tensor of logits shaped "
                      f"(batch, seq_len, vocab_size) = {want} (a last dimension of at least "
                      f"model.vocab_size={cfg.model.vocab_size}), or a tuple of it and a 0-dim auxiliary loss")


def will_resume(cfg: JobConfig) -> bool:
    """Whether the run will continue from a checkpoint of its own (then model.init_from is not read)."""
    from .checkpoint import list_steps

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    return (cfg.checkpoint.resume or restarted) and bool(list_steps(os.path.join(cfg.output.dir, "checkpoints")))


def check_init_from(model: nn.Module, cfg: JobConfig) -> None:
    """ConfigError listing what does not fit if model.init_from's keys and shapes (headers only, no
    tensor data) do not match the model: found here, before any process-group work."""
    from pp.weights import WeightsError, WeightValuesError, load_weights

    from .models import init_options

    src, out = os.path.abspath(cfg.model.init_from), os.path.abspath(cfg.output.dir)
    if src == out or src.startswith(out + os.sep):
        raise ConfigError(f"model.init_from={cfg.model.init_from!r} lies in output.dir={cfg.output.dir!r}, whose "
                          f"checkpoints a fresh run removes: copy them elsewhere, or set checkpoint.resume: true")
    try:
        load_weights(model, cfg.model.init_from, check_only=True, **init_options(cfg.model))
    except WeightValuesError as e:   # names fit: another layout would not mend the values (transformers casts them)
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {e}") from None
    except WeightsError as e:
        converted = converted_init_from(cfg.model)
        if converted is not None:   # a layout transformers converts as it loads (Mixtral's experts)
            try:
                load_weights(model, converted, check_only=True, **init_options(cfg.model))
                return
            except WeightsError:
                pass
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {e}") from None


def converted_init_from(model_cfg: Any) -> dict | None:
    """model.init_from as transformers' `from_pretrained` loads it (converting older checkpoint layouts),
    for an hf model whose directory's names do not fit as they are; None otherwise."""
    if not (is_hf_model(model_cfg.name) and os.path.isdir(model_cfg.init_from)):
        return None
    from pp import hf

    return hf.converted_weights(model_cfg.name, model_cfg.config, model_cfg.init_from)


def tp_plan_for(model: nn.Module, cfg: JobConfig) -> dict | None:
    """The model's `tp_plan()` when parallel.tp > 1, checked against the model; ConfigError if the
    model has none or it names a module that is not an nn.Linear whose sharded width tp divides."""
    tp = cfg.parallel.tp
    if tp == 1:
        return None
    make = getattr(model, "tp_plan", None)
    if not callable(make):
        raise ConfigError(f"parallel.tp={tp}: model {cfg.model.name!r} has no tp_plan() method naming the "
                          f"nn.Linear modules to shard (pp.tp.ColwiseParallel / RowwiseParallel)")
    plan = dict(make())
    try:
        kinds = {name: p.kind for name, p in normalize_plan(plan).items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"parallel.tp={tp}: the model's tp_plan() is not usable: {e}") from None
    modules = dict(model.named_modules())
    for name, kind in kinds.items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise ConfigError(f"parallel.tp={tp}: the model's tp_plan() names {name!r}, which is not an "
                              f"nn.Linear of model {cfg.model.name!r}")
        key, n = ("out_features", mod.out_features) if kind == "col" else ("in_features", mod.in_features)
        if n % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {name}.{key}={n}")
    return plan


def example_microbatch(cfg: JobConfig, device: str = "cpu") -> torch.Tensor:
    """Token ids shaped like one microbatch of one data-parallel replica, for tracing."""
    mb = cfg.train.batch_size // (cfg.parallel.dp * cfg.schedule.microbatches)
    return torch.zeros((mb, cfg.model.seq_len), dtype=torch.long, device=device)


def split_model(model: nn.Module, cfg: JobConfig, layout: Layout) -> Pipe:
    """Cut `model` into `layout.n_stages` stages at the configured points, or balanced automatically."""
    kwargs: dict = {}
    if cfg.split.points:
        check_split_points(cfg.split.points, model)
        kwargs["split_spec"] = {p: SplitPoint.BEGINNING for p in cfg.split.points}
        key = f"split.points={list(cfg.split.points)}"
    else:
        policy = split_by_cost if cfg.split.policy == "cost" else split_into_equal_size
        kwargs["split_policy"] = policy(layout.n_stages)
        key = f"parallel.pp={layout.pp} ({count(layout.n_stages, 'stage')})"
    try:   # pp.run calls forward(tokens): a forward that cannot take that is named before the trace fails
        inspect.signature(model.forward).bind(None)
    except TypeError as e:
        raise ConfigError(f"model.name={cfg.model.name!r}: pp.run calls forward with one tensor of token ids, but "
                          f"{type(model).__name__}.forward{inspect.signature(model.forward)} cannot take it ({e})") from None
    try:
        on_meta = any(p.is_meta for p in model.parameters())
        # every step and every evaluation runs this one microbatch shape: fixed sizes trace in half the time
        pipe = pipeline(model, mb_args=(example_microbatch(cfg, "meta" if on_meta else "cpu"),), dynamic=False,
                        **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot split model {cfg.model.name!r} for {key}: {first}") from None
    if pipe.num_stages != layout.n_stages:
        raise ConfigError(f"split.points={cfg.split.points} cut the model into {pipe.num_stages} stages, "
                          f"but {layout.n_stages} are needed")
    for i in range(pipe.num_stages):   # each rank's optimizer needs something to train
        if not any(p.requires_grad for p in pipe.get_stage_module(i).parameters()):
            raise ConfigError(f"{key} leaves stage {i} without trainable parameters (a cut "
                              f"{'before the first' if i == 0 else 'right after another cut or after the last'} "
                              f"module that holds any); move the cut")
    return pipe
