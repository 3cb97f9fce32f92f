"""Training precision: fp32, bf16-mixed (fp32 master weights, bf16 compute) and pure bf16, applied to the
runtime stages of `pp.parallelize`.

`bf16-mixed` keeps parameters, gradients and AdamW state in float32. Each matrix parameter (a floating
parameter of two or more dimensions: linear and convolution weights; not embedding tables, which autocast
leaves float32) of a traced stage that only ops autocast casts read gets a bfloat16 copy that the stage's graph reads instead (`Bf16Weights`;
a weight another op reads, such as Mixtral's grouped expert matmul, stays float32 and is cast per op): the copies are refreshed in place
from the float32 masters once per step (the stage's first forward after a step), not cast again for
every microbatch. Each microbatch's bfloat16 weight gradient is added into the float32 master's `.grad`
right as it arrives (the master's tensor and post-accumulate hooks then run, once per microbatch), so
gradients accumulate in float32 across microbatches and data-parallel reductions and the gradient norm
stay in float32. The forward still runs under `torch.autocast(device_type, dtype=torch.bfloat16)`, which
now finds the matrices in bfloat16 already (its cast is a no-op) and still computes norms, softmax and the
loss in float32 (`loss_fn` runs under the last stage's autocast too, as in the unsplit loop; 1-D parameters, norm scales and biases, stay float32 and autocast casts them as before).
The activations a stage sends (and the gradients coming back) are bfloat16. Autograd never reaches a
copied master's AccumulateGrad node, so hooks put on that node do not run (its tensor and post-accumulate
hooks do); `WEIGHT_COPIES = False` restores the per-microbatch casts.
`bf16` casts the parameters themselves (and so gradients and optimizer state) to bfloat16.
"""
from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from pp.stage.runtime import PipelineStage

__all__ = ["PRECISIONS", "check_precision", "param_dtype", "cast_module", "apply_precision", "Bf16Weights",
           "master_of"]

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
# False: bf16-mixed casts the float32 weights under autocast for every microbatch, as pp did before the
# copies (tests compare the two)
WEIGHT_COPIES = True
_HOLDER = "_pp_bf16"   # the submodule of a traced stage whose (plain) attributes are the bfloat16 copies


def check_precision(precision: object, key: str = "precision") -> str:
    """`precision` if it is one of `PRECISIONS` (in any case, as the config takes it: "BF16-Mixed" is
    "bf16-mixed"), else ValueError naming `key` and the value."""
    if isinstance(precision, str) and precision not in PRECISIONS and precision.lower() in PRECISIONS:
        return precision.lower()
    if precision not in PRECISIONS:
        raise ValueError(f"{key}={precision!r} is not a precision pp knows; expected one of "
                         f"{', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def param_dtype(precision: str) -> torch.dtype:
    """The dtype parameters are kept in: float32, except bfloat16 for pure `bf16`."""
    return torch.bfloat16 if check_precision(precision) == "bf16" else torch.float32


def cast_module(module: nn.Module, precision: str) -> nn.Module:
    """`module` with its floating parameters and buffers in `param_dtype(precision)` (in place)."""
    dtype = param_dtype(precision)
    if any(t.is_floating_point() and t.dtype != dtype for t in (*module.parameters(), *module.buffers())):
        module.to(dtype)
    return module


def apply_precision(stage: PipelineStage, precision: str) -> None:
    """Make `stage` compute in `precision`: bf16-mixed turns autocast on around its forward and, for a
    traced stage, gives its matrix parameters bfloat16 copies (`Bf16Weights`, `stage.bf16_weights`); both
    bf16 settings make it send (and accept) bfloat16 activations where it was traced with float32 ones."""
    precision = check_precision(precision)
    if isinstance(stage.submod, fx.GraphModule):
        _drop_copies(stage.submod)   # from an earlier parallelize of the same Pipe: read the masters again
    if precision == "fp32":
        return
    stage.activation_dtype = torch.bfloat16
    stage.autocast = precision == "bf16-mixed"
    if WEIGHT_COPIES and stage.autocast and isinstance(stage.submod, fx.GraphModule) and stage.bf16_weights is None:
        weights = Bf16Weights(stage.submod)
        if weights.copies:
            stage.bf16_weights = weights


def master_of(t: torch.Tensor) -> torch.Tensor | None:
    """The float32 master parameter of a bfloat16 copy made by `Bf16Weights`, else None."""
    return getattr(t, "_pp_master", None)


class Bf16Weights:
    """The bfloat16 copies one traced stage (an fx.GraphModule, changed in place) computes with under
    bf16-mixed: one per float32 parameter of two or more dimensions that its graph reads, each a leaf
    tensor the graph's reads of that parameter now go to, shared by every name it is read under.

    `refresh()` copies the masters into the copies in place (same memory: what a CUDA graph or a saved
    tensor holds stays valid); the stage calls it at its first forward of each step (`stale`).
    A copy's gradient goes into its master's float32 `.grad` as it arrives (`_to_master`).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        _drop_copies(gm)
        self.masters: list[nn.Parameter] = []
        self.copies: list[torch.Tensor] = []
        self.names: list[str] = []      # each copy's attribute path in `gm` (what its graph reads)
        holder = nn.Module()
        names: dict[int, str] = {}
        reads = [(node, _attr(gm, node.target)) for node in gm.graph.nodes if node.op == "get_attr"]
        # a parameter any of whose reads meets an op autocast does not cast (Mixtral's grouped expert
        # matmul with its input cast to float32 when traced; a weight scaled before use) stays float32
        fp32_only = {id(p) for node, p in reads
                     if isinstance(p, torch.Tensor) and not _autocast_reads(node, p.device.type)}
        for node, p in reads:
            if not (isinstance(p, nn.Parameter) and p.requires_grad and p.dtype == torch.float32 and p.dim() >= 2):
                continue
            if id(p) in fp32_only:
                continue
            name = names.get(id(p))
            if name is None:
                name = names[id(p)] = f"w{len(self.copies)}"
                copy = torch.empty(p.shape, dtype=torch.bfloat16, device=p.device).requires_grad_(True)
                copy._pp_master = p  # type: ignore[attr-defined]
                copy.register_post_accumulate_grad_hook(functools.partial(_to_master, p))
                holder.__dict__[name] = copy   # a plain attribute: no parameter, buffer or state-dict entry
                self.masters.append(p)
                self.copies.append(copy)
                self.names.append(f"{_HOLDER}.{name}")
            holder.__dict__.setdefault("_pp_targets", {})[f"{_HOLDER}.{name}"] = node.target
            node.target = f"{_HOLDER}.{name}"
        if self.copies:
            gm.add_submodule(_HOLDER, holder)
            gm.recompile()
        self.refresh()      # valid from the start, for a direct call of the module too
        self.stale = True

    def refresh(self) -> None:
        """The copies from the masters' current values (in place; one fused copy), their storage
        allocated again first if `release` freed it. A stage with no copy (all frozen, or only
        1-D parameters) has nothing to do."""
        if not self.copies:
            self.stale = False
            return
        with torch.no_grad():
            for c, p in zip(self.copies, self.masters):
                if c.untyped_storage().size() == 0:
                    c.untyped_storage().resize_(c.numel() * c.element_size())
                if c.requires_grad != p.requires_grad:   # a master frozen (or thawed) between steps
                    c.requires_grad_(p.requires_grad)
            torch._foreach_copy_(self.copies, [p.detach() for p in self.masters])
        self.stale = False

    def release(self) -> None:
        """Free the copies' storage until the next `refresh` (ZeRO 3 between steps, when the whole
        float32 parameters are freed too: a rank then holds no whole weight of its stages)."""
        for c in self.copies:
            c.untyped_storage().resize_(0)
        self.stale = True


# What takes a bfloat16 copy in a float32 parameter's place with the same result under autocast: the ops
# autocast runs in bfloat16 on CPU and CUDA alike (it casts every input to it; einsum through its bmm),
# reached through views. Not `embedding`: autocast leaves it float32 (a float32 table gives a float32
# residual stream; a bfloat16 copy would round it), nor ops only CUDA's autocast casts (`_CUDA_ONLY`).
_AUTOCAST_OPS = frozenset({
    "linear", "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "einsum",
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "conv_tbc", "prelu",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention"})
_CUDA_ONLY = frozenset({"mv", "addmv", "addr", "chain_matmul", "linalg_multi_dot"})
_VIEW_OPS = frozenset({
    "t", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze",
    "slice", "select", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind", "narrow",
    "contiguous", "numpy_T", "mT"})


def _autocast_reads(node: fx.Node, device_type: str) -> bool:
    """Whether every use of `node`'s value (through views) is an op autocast runs in bfloat16 on
    `device_type` (`_AUTOCAST_OPS`, and `_CUDA_ONLY` on cuda)."""
    ops = _AUTOCAST_OPS | _CUDA_ONLY if device_type == "cuda" else _AUTOCAST_OPS
    stack, seen = list(node.users), set()
    while stack:
        use = stack.pop()
        if use in seen:
            continue
        seen.add(use)
        if use.op != "call_function":
            return False
        name = "getitem" if use.target is operator.getitem else getattr(use.target, "_opname", None)
        if name in _VIEW_OPS or name == "getitem":
            stack.extend(use.users)
        elif name not in ops:
            return False
    return True


def _drop_copies(gm: fx.GraphModule) -> None:
    """Undo `Bf16Weights` on `gm` (its graph reads the float32 parameters again), if it was applied."""
    holder = getattr(gm, _HOLDER, None)
    if holder is None:
        return
    original = holder.__dict__.get("_pp_targets", {})
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in original:
            node.target = original[node.target]
    delattr(gm, _HOLDER)
    gm.recompile()


def _attr(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _to_master(master: nn.Parameter, copy: torch.Tensor) -> None:
    """A copy's microbatch gradient (just accumulated into its `.grad`) added to its master's float32
    `.grad`; the master's tensor hooks see it first and its post-accumulate hooks run after, as they would
    had autograd reached the master itself."""
    g, copy.grad = copy.grad, None
    if g is None or not master.requires_grad:
        return
    hooks = master._backward_hooks
    if hooks:
        g = g.float()
        for hook in list(hooks.values()):
            got = hook(g)
            if got is not None:
                g = got
    with torch.no_grad():
        if master.grad is None:
            master.grad = g.to(master.dtype, memory_format=torch.contiguous_format)
        else:
            master.grad.add_(g)
    for hook in list((getattr(master, "_post_accumulate_grad_hooks", None) or {}).values()):
        hook(master)
