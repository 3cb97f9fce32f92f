"""Measure each layer of a config's model on this rank's device: forward, input-grad (I), weight-grad
(W) and full-backward (B) time, activation memory and optimizer time, one microbatch size at a time.

The model is traced on the meta device and cut at every layer boundary (the segments the splitter may
cut between: `<before>`, each block, `<after>`); one layer at a time gets real storage, runs a few
timed iterations in the config's precision and activation checkpointing, and is let go. Timing syncs
the device here only (never in training).
"""
from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from pp.stage.pipe import MODEL_INPUT


@dataclass(frozen=True)
class LayerCost:
    """What one layer (segment) costs for one microbatch: seconds and bytes, measured.

    `cut` is the module name where a stage may begin at this layer (a `split.points` entry), None where
    a stage cannot begin there. `act_bytes`: memory its forward holds until the backward is done;
    `act_after_i_bytes`: what of it is still held between I and W; `out_bytes`: its outputs (sent on).
    """

    name: str
    cut: str | None
    forward_s: float
    backward_s: float
    input_grad_s: float
    weight_grad_s: float
    optimizer_s: float
    act_bytes: int
    act_after_i_bytes: int
    out_bytes: int
    params: int

    def worst(self, other: "LayerCost") -> "LayerCost":
        """Field by field the larger of two measurements of the same layer (ranks agree on it)."""
        pick = {k: max(getattr(self, k), getattr(other, k)) for k in (
            "forward_s", "backward_s", "input_grad_s", "weight_grad_s", "optimizer_s", "act_bytes",
            "act_after_i_bytes", "out_bytes", "params")}
        return LayerCost(self.name, self.cut, **pick)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_paths(seg) -> set[str]:
    """The module names the nodes of segment `seg` ran inside (each enclosing module, outermost first)."""
    return {fqn for node in seg.nodes for fqn, _ in (node.meta.get("nn_module_stack") or {}).values() if fqn}


def _cut_name(seg, modules: dict, earlier: set[str]) -> str | None:
    """The module name a `split.points` entry uses to begin a stage at segment `seg`, if it has one: the
    segment's own name, or for glue code (`<after>`: the final norm and head) the outermost module that
    begins in it, one no earlier segment ran inside (`model.norm`, not `model`, which began before)."""
    if not seg.name.startswith("<"):
        return seg.name
    for node in seg.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = sorted((fqn for fqn, _ in stack.values() if fqn), key=len)
        if paths:
            return next((p for p in paths if p not in earlier and p in modules), None)
    return None


def layer_pipe(cfg, trace_mb: int):
    """The config's model on the meta device, cut at every layer: (pipe, [cut name or None per layer],
    [segment names])."""
    from pp import pipeline
    from pp.launcher.models import build_model

    from pp.parallel.precision import cast_module

    model = build_model(cfg.model, cfg.train.seed, device="meta")
    if cfg.train.precision == "bf16":   # traced in bf16, as pp.run traces it (its graph's dtype casts)
        cast_module(model, "bf16")
    found: list = []

    def every_layer(segments):
        found[:] = list(segments)
        return list(range(len(segments)))

    tokens = torch.zeros((trace_mb, cfg.model.seq_len), dtype=torch.long, device="meta")
    pipe = pipeline(model, mb_args=(tokens,), split_policy=every_layer)
    modules = dict(model.named_modules())
    cuts, earlier = [], set()
    for seg in found:
        cuts.append(_cut_name(seg, modules, earlier))
        earlier |= _module_paths(seg)
    return pipe, cuts, [s.name for s in found]


def _init(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.normal_(0.0, 0.02) if t.dim() >= 2 else t.fill_(1.0 if name.endswith("weight") else 0.0)
    else:
        t.zero_()


def _timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()  # warm-up: kernels, allocator, autograd caches
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def measure_layers(cfg, device: torch.device, microbatch_sizes: Sequence[int], iters: int = 3,
                   ) -> dict[int, list[LayerCost]]:
    """{microbatch size: [LayerCost per layer]} for `cfg` (a JobConfig) on `device`.

    Each layer runs `iters` timed iterations (after one warm-up) of forward, full backward, and the I/W
    halves pp's zero-bubble stages run, with inputs of shape (size, model.seq_len). A size that runs out
    of device memory is left out of the result. ValueError for an empty or non-positive size list.
    """
    from pp.launcher.models import init_fn
    from pp.launcher.train import lm_loss
    from pp.parallel.checkpointing import apply_checkpointing
    from pp.parallel.meta import fill, materialize
    from pp.parallel.precision import cast_module

    sizes = sorted({int(s) for s in microbatch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"microbatch_sizes must be positive integers, got {list(microbatch_sizes)!r}")
    precision, ac = cfg.train.precision, cfg.train.activation_checkpointing
    pipe, cuts, names = layer_pipe(cfg, max(2, sizes[-1]))
    info = pipe.info()
    gen = torch.Generator().manual_seed(cfg.train.seed)
    vocab, seq = cfg.model.vocab_size, cfg.model.seq_len
    flat_in = {b: info.input_binder.flatten((torch.randint(0, vocab, (b, seq), generator=gen).to(device),), {})
               for b in sizes}
    targets = {b: torch.randint(0, vocab, (b, seq), generator=gen).to(device) for b in sizes}
    outputs: dict[int, list[tuple]] = {b: [] for b in sizes}
    result: dict[int, list[LayerCost]] = {b: [] for b in sizes}
    dead: set[int] = set()
    last = info.num_stages - 1
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext())
    for s, io in enumerate(info.stage_io):
        mod = pipe.get_stage_module(s)
        materialize(mod, device)
        with warnings.catch_warnings():   # values only need to be plausible for timing: the warning that a
            warnings.simplefilter("ignore")   # non-persistent buffer (rotary frequencies) was guessed is not the user's
            fill(mod, init_fn(cfg.model, cfg.train.seed) or _init)
        if precision == "bf16":
            cast_module(mod, precision)
        apply_checkpointing(mod, ac, once=True)  # I and W both run: recompute once per microbatch
        params = [p for p in mod.parameters() if p.requires_grad]
        act_dtype = torch.bfloat16 if precision != "fp32" else None
        for b in sizes:
            if b in dead:
                continue
            raw = [flat_in[b][i] if src == MODEL_INPUT else outputs[b][src][i] for src, i in io.input_sources]
            try:
                cost, outs = _measure_one(mod, raw, params, s == last, targets[b], lm_loss, autocast,
                                          act_dtype, device, iters)
            except torch.cuda.OutOfMemoryError:
                dead.add(b)
                continue
            outputs[b].append(outs)
            result[b].append(LayerCost(names[s], cuts[s] if s else None, **cost))
        opt_s = _optimizer_time(params, device, iters)
        for b in sizes:
            if b not in dead:
                result[b][-1] = LayerCost(**{**result[b][-1].__dict__, "optimizer_s": opt_s})
        pipe.stage_modules[s] = nn.Module()  # let this layer's storage go
        del mod, params
    return {b: result[b] for b in sizes if b not in dead}


def _measure_one(mod, raw, params, is_last, target, loss_fn, autocast, act_dtype, device, iters):
    """Time one layer on one microbatch; returns (LayerCost fields but the optimizer's, detached outputs)."""
    from pp.stage.backward import input_grads, weight_grads

    def leaf(x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        x = x.detach()
        if act_dtype is not None:
            x = x.to(act_dtype)
        return x.requires_grad_(True)

    inputs = [leaf(x) for x in raw]
    grad_inputs = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def forward():
        with autocast:
            out = mod(*inputs)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if is_last:
            roots = [loss_fn(out[0], target)]
        else:
            roots = [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
        return out, roots

    def seeds(roots):
        return [torch.ones_like(r) for r in roots]

    def fwd_only():
        with torch.no_grad():
            forward()

    def full_backward():
        _, roots = forward()
        if roots:
            torch.autograd.backward(roots, seeds(roots))

    # forward time counts the graph building the training forward does
    forward_s = _timed(lambda: forward(), device, iters)
    backward_s = max(_timed(full_backward, device, iters) - forward_s, 0.0)
    i_total = w_total = 0.0
    for k in range(iters + 1):
        _, roots = forward()
        sd = seeds(roots)
        _sync(device)
        t0 = time.perf_counter()
        grads, pending = input_grads(roots, sd, grad_inputs) if roots else ([], None)
        _sync(device)
        t1 = time.perf_counter()
        weight_grads(pending)
        _sync(device)
        if k:  # the first is a warm-up
            i_total += t1 - t0
            w_total += time.perf_counter() - t1
        del grads, pending, roots, sd
    act, after_i = _activation_bytes(forward, seeds, grad_inputs, params, device)
    for p in params:
        p.grad = None
    with torch.no_grad(), autocast:
        out = mod(*inputs)
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    out = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
    out_bytes = sum(o.numel() * o.element_size() for o in out if isinstance(o, torch.Tensor))
    n_params = sum(p.numel() for p in params)
    fields = dict(forward_s=forward_s, backward_s=backward_s, input_grad_s=i_total / iters,
                  weight_grad_s=w_total / iters, optimizer_s=0.0, act_bytes=int(act),
                  act_after_i_bytes=int(after_i), out_bytes=int(out_bytes), params=n_params)
    return fields, out


def _activation_bytes(forward, seeds, grad_inputs, params, device) -> tuple[int, int]:
    """Bytes one microbatch's forward holds until its backward (and after I, until W). On CUDA the
    allocator's count; elsewhere the tensors autograd saves (parameters not counted), the same after I."""
    from pp.stage.backward import input_grads, weight_grads

    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        out, roots = forward()
        held = torch.cuda.memory_allocated(device) - base
        grads, pending = input_grads(roots, seeds(roots), grad_inputs) if roots else ([], None)
        del out, roots, grads
        after_i = torch.cuda.memory_allocated(device) - base
        weight_grads(pending)
        return max(held, 0), max(min(after_i, held), 0)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, roots = forward()
    held = sum(seen.values()) + sum(o.numel() * o.element_size() for o in out if isinstance(o, torch.Tensor)
                                    and o.untyped_storage().data_ptr() not in seen)
    return held, held


def _optimizer_time(params: list[torch.Tensor], device: torch.device, iters: int) -> float:
    """Seconds of one AdamW step over `params` (float32 master copies for bf16-mixed are the params)."""
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-9)
    t = _timed(opt.step, device, iters)
    for p in params:
        p.grad = None
    return t
