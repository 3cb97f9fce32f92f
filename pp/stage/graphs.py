"""CUDA-graph replay of one stage's forward and backward, for stages whose host time (kernel launches)
exceeds their GPU time.

A captured forward writes its activations into fixed memory, so the next replay overwrites them: a
stage keeps K copies ("slots") of each graph, K being the most microbatches the schedule has in flight
on that stage, and a microbatch holds its slot from its forward to its backward. Weight gradients are
summed inside the backward graphs into one buffer per parameter, and added to `.grad` once per step
(`flush`), so a replayed backward launches nothing but its graph. Zero-bubble schedules get their
backward as two graphs, input gradients (I) and weight gradients (W), split as in eager. Capture
happens between steps, for the input shapes the previous step saw, never while messages are in flight.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..parallel.checkpointing import capturing, regions
from .backward import input_grads, weight_grads
from .tensor_hooks import hooks_seen

Signature = tuple  # ((shape, dtype, requires_grad), ...) of one microbatch's stage inputs


class _WarmUpFailed(RuntimeError):
    """The stage failed (or synchronised with the host) in the warm-up before capture."""


def _set_sync_debug_mode(mode: Any) -> None:
    with warnings.catch_warnings():   # torch calls the mode a prototype, every time it is set
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


def _end_failed_capture() -> None:
    """After a capture that raised, run one empty capture: it resets the CUDA RNG's capture state,
    which a failed capture can leave set (every later random op would then raise)."""
    try:
        with warnings.catch_warnings():   # "the CUDA graph is empty": it is meant to be
            warnings.simplefilter("ignore", UserWarning)
            with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                pass
    except Exception:  # noqa: BLE001 - best effort; the original failure is what gets reported
        pass


def signature_of(inputs: list) -> Signature | None:
    """The replay key of a microbatch's inputs; None when an input is not a tensor (not graphable)."""
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return None
    return tuple((x.shape, x.dtype, x.requires_grad) for x in inputs)


class _Slot:
    """One captured forward graph and its backward: one graph (`bwd`), or for schedules that split
    backward, an input-gradient graph (`bwd`) and a weight-gradient graph (`bwd_w`)."""

    def __init__(self, sig: Signature, module: nn.Module, sample: list[torch.Tensor], names: list[str],
                 params: list[nn.Parameter], acc: list[torch.Tensor], split: bool,
                 autocast_dtype: torch.dtype | None = None, touched: set[int] | None = None):
        self.pool = torch.cuda.graph_pool_handle()   # private: slots must never share activation memory
        self.sig = sig
        self.split = split
        self.inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in sample]
        aliases = _aliases(params)
        self.fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=self.pool, capture_error_mode="thread_local"):
            out = _call(module, names, aliases, self.inputs, autocast_dtype)
        flat, self.spec = pytree.tree_flatten(out)
        if not all(isinstance(o, torch.Tensor) for o in flat):
            raise TypeError("the stage returns non-tensor values")
        self.outputs = flat
        self.diff = [i for i, o in enumerate(flat) if o.requires_grad]
        self.is_diff = [o.requires_grad for o in flat]
        self.grad_outputs = [torch.zeros_like(flat[i]) for i in self.diff]
        self.grad_input_idx = [i for i, x in enumerate(self.inputs) if x.requires_grad]
        self.grad_inputs: list = [None] * len(self.inputs)
        self.used_params: list[int] = []
        self.touched = touched if touched is not None else set()
        self.reach = _reach([flat[i] for i in self.diff], aliases, self.inputs)
        self._live: dict[tuple, tuple[frozenset, frozenset]] = {}
        self.live_inputs: frozenset = frozenset()
        self.bwd = self.bwd_w = None
        if not self.diff:
            return
        roots = [flat[i] for i in self.diff]
        if split:
            self._capture_split(roots, aliases, acc)
        else:
            self._capture_whole(roots, aliases, acc)

    def _capture_whole(self, roots: list, aliases: list, acc: list) -> None:
        targets = [self.inputs[i] for i in self.grad_input_idx] + aliases
        n = len(self.grad_input_idx)
        self.bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.bwd, pool=self.pool, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(roots, targets, self.grad_outputs, allow_unused=True)
            self.used_params = [k for k, g in enumerate(grads[n:]) if g is not None]
            if self.used_params:
                torch._foreach_add_([acc[k] for k in self.used_params], [grads[n + k] for k in self.used_params])
        for i, g in zip(self.grad_input_idx, grads[:n]):
            self.grad_inputs[i] = g

    def _capture_split(self, roots: list, aliases: list, acc: list) -> None:
        """I as one graph, W as another, with the I/W split of eager zero-bubble schedules
        (`pp.stage.backward`): W's state (split-node gradients, saved tensors) lives in the slot's pool
        from I's replay to W's. W writes each weight gradient once into the alias's `.grad`, which the
        same graph adds to the stage's sums."""
        inputs = [self.inputs[i] for i in self.grad_input_idx]
        if not inputs:   # nothing to hand back (first stage): no I graph, W is the whole backward
            got, pending = input_grads(roots, list(self.grad_outputs), inputs)
        else:
            self.bwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.bwd, pool=self.pool, capture_error_mode="thread_local"):
                got, pending = input_grads(roots, list(self.grad_outputs), inputs)
        for i, g in zip(self.grad_input_idx, got):
            self.grad_inputs[i] = g
        if not aliases:
            return
        self.bwd_w = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.bwd_w, pool=self.pool, capture_error_mode="thread_local"):
            weight_grads(pending)
            self.used_params = [k for k, a in enumerate(aliases) if a.grad is not None]
            if self.used_params:
                torch._foreach_add_([acc[k] for k in self.used_params], [aliases[k].grad for k in self.used_params])
        for a in aliases:
            a.grad = None

    def load_grad_outputs(self, grads: list) -> None:
        """Copy the gradients of the outputs (by output index; None: zero) into the static ones, and
        note which parameters and inputs the outputs that got one reach: the replay computes the others
        from zeros, where eager autograd gives them no gradient at all."""
        present = tuple(grads[i] is not None for i in self.diff)
        for static, i in zip(self.grad_outputs, self.diff):
            g = grads[i]
            if g is None:
                static.zero_()
            else:
                static.copy_(g)
        live = self._live.get(present)
        if live is None:
            params = frozenset().union(*[r[0] for r, p in zip(self.reach, present) if p])
            inputs = frozenset().union(*[r[1] for r, p in zip(self.reach, present) if p])
            live = self._live[present] = (params, inputs)
        self.touched.update(live[0])
        self.live_inputs = live[1]

    def fresh_grad_inputs(self) -> list:
        """The input gradients of the last replay as new tensors (the static ones are overwritten by the
        next, and a transfer may still be reading these); None for an input that no output with a
        gradient reaches, as in eager."""
        return [None if g is None or i not in self.live_inputs else g.clone()
                for i, g in enumerate(self.grad_inputs)]


def _reach(roots: list[torch.Tensor], params: list[torch.Tensor],
           inputs: list[torch.Tensor]) -> list[tuple[frozenset, frozenset]]:
    """For each root, the indices of the `params` and of the `inputs` its autograd graph reaches: the
    leaves eager autograd gives a gradient from that root alone. Walked once per root at capture."""
    where = {id(t): ("p", k) for k, t in enumerate(params)}
    where.update({id(t): ("x", i) for i, t in enumerate(inputs) if t.requires_grad})
    out = []
    for r in roots:
        found: dict[str, set] = {"p": set(), "x": set()}
        if r.grad_fn is None:       # a leaf returned as it is
            if id(r) in where:
                found[where[id(r)][0]].add(where[id(r)][1])
        else:
            stack, seen = [r.grad_fn], {r.grad_fn}
            while stack:
                node = stack.pop()
                var = getattr(node, "variable", None)
                if var is not None and id(var) in where:
                    found[where[id(var)][0]].add(where[id(var)][1])
                for nxt, _ in node.next_functions:
                    if nxt is not None and nxt not in seen:
                        seen.add(nxt)
                        stack.append(nxt)
        out.append((frozenset(found["p"]), frozenset(found["x"])))
    return out


def _aliases(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """New leaves on the parameters' memory. Captured code differentiates these, so autograd meets no
    gradient accumulator made eagerly on another stream (torch warns about, or refuses, such a stale
    stream during capture); replays still read the live parameters, whose memory this is."""
    return [p.detach().requires_grad_(True) for p in params]


def _call(module: nn.Module, names: list[str], aliases: list[torch.Tensor], inputs: list,
          autocast_dtype: torch.dtype | None = None) -> Any:
    """The stage's forward reading `aliases` under `names`; under autocast (without its weight-cast
    cache, whose entries a graph must not keep) where `autocast_dtype` is given."""
    if autocast_dtype is None:
        return torch.func.functional_call(module, dict(zip(names, aliases)), tuple(inputs))
    with torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False):
        return torch.func.functional_call(module, dict(zip(names, aliases)), tuple(inputs))


class _Replay(torch.autograd.Function):
    """One autograd node per replayed microbatch: forward replays the slot's forward graph, backward
    its backward graph. Input gradients come back as fresh tensors (the slot's own are reused); weight
    gradients go to the stage's gradient sums inside the graph, so they are not outputs here."""

    @staticmethod
    def forward(ctx, slot: _Slot, anchor: torch.Tensor, *inputs: torch.Tensor):
        for static, x in zip(slot.inputs, inputs):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)
        slot.fwd.replay()
        ctx.slot = slot
        ctx.set_materialize_grads(False)   # an output with no gradient arrives as None, not zeros
        # A non-differentiable output (a mask, say) is copied: no backward orders its next overwrite
        # after the consumer has read it.
        outs = tuple(o.detach() if d else o.clone() for o, d in zip(slot.outputs, slot.is_diff))
        if len(slot.diff) < len(outs):
            ctx.mark_non_differentiable(*[o for o, d in zip(outs, slot.is_diff) if not d])
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        slot: _Slot = ctx.slot
        if slot.split:
            raise RuntimeError("pp: this stage replays its backward in two halves (I and W); run it "
                               "through the schedule, not through autograd")
        slot.load_grad_outputs(list(grads))
        slot.bwd.replay()
        return (None, None) + tuple(slot.fresh_grad_inputs())


class StageGraphs:
    """The CUDA graphs of one stage: `slots` copies per input signature, at most `max_shapes` signatures.

    `forward(m, inputs)` replays when a copy for these shapes is captured and free, else returns None
    (the stage then runs eagerly); `release(m)` frees microbatch m's copy after its backward;
    `capture_pending()` captures the shapes seen since, between steps; `flush()` adds the summed weight
    gradients to `.grad`.
    """

    def __init__(self, module: nn.Module, slots: int, stage_index: int, device: torch.device,
                 max_shapes: int = 4, split: bool = False, autocast_dtype: torch.dtype | None = None,
                 weights: Any = None):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.module = module
        self.device = device
        self.split = split      # backward replayed as I and W (zero-bubble schedules)
        self.slots = slots
        self.stage_index = stage_index
        self.max_shapes = max_shapes
        # bf16-mixed: forward captured under autocast to this dtype (replayed only under the same)
        self.autocast_dtype = autocast_dtype
        # The leaves the graphs differentiate (`params`, read under `names`) and the tensor whose `.grad`
        # each one's gradient goes to (`grad_of`): the parameter itself, or for a bfloat16 weight copy
        # (`pp.parallel.precision.Bf16Weights`, read by the graph in place of its float32 master) the
        # master, its gradient summed in float32.
        copied = {id(m) for m in weights.masters} if weights is not None else set()
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in copied]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.grad_of = list(self.params)
        if weights is not None:
            self.names += weights.names
            self.params += weights.copies
            self.grad_of += weights.masters
        self._acc = [torch.zeros_like(t) for t in self.grad_of]
        # An input that requires grad, so that a stage fed only integers (token ids) still gets a node
        # whose backward replays the graph that computes its weight gradients.
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        self._used: list[int] = []     # indices of the parameters the captured backwards reach, sorted
        self._touched: set[int] = set()   # those this step's replays reached from outputs with a gradient
        self._dirty = False
        self._graphs: dict[Signature, list[_Slot]] = {}
        self._free: dict[Signature, list[_Slot]] = {}
        self._held: dict[int, _Slot] = {}
        self._seen: dict[Signature, list[torch.Tensor]] = {}
        self.disabled_reason: str | None = None
        self.active = False     # the schedule turns replay on for training steps only
        self.replays = 0        # microbatches replayed so far (for checks and logs)
        self._noted: set[str] = set()

    # ------------------------------------------------------------------------------ hot path
    def forward(self, m: int, inputs: list) -> tuple | None:
        if not self.active or self.disabled_reason is not None:
            return None
        if self._autocast_now() != self.autocast_dtype:
            self._note("runs eagerly: its graphs were captured "
                       + (f"under autocast to {self.autocast_dtype}" if self.autocast_dtype else "without autocast"))
            return None
        sig = signature_of(inputs)
        if sig is None:
            return None
        free = self._free.get(sig)
        if not free:
            if sig not in self._graphs and sig not in self._seen:
                if len(self._graphs) + len(self._seen) < self.max_shapes:
                    self._seen[sig] = [torch.empty_like(x).requires_grad_(x.requires_grad) for x in inputs]
                else:
                    self._note(f"has seen more than max_shapes={self.max_shapes} input shapes; inputs of "
                               f"other shapes run eagerly")
            return None
        slot = free.pop()
        self._held[m] = slot
        self._dirty = True
        self.replays += 1
        out = _Replay.apply(slot, self._anchor, *inputs)
        return pytree.tree_unflatten(list(out), slot.spec)

    @staticmethod
    def _autocast_now() -> torch.dtype | None:
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None

    def _note(self, what: str) -> None:
        """Warn once per reason that this stage runs a microbatch eagerly."""
        if what not in self._noted:
            self._noted.add(what)
            warnings.warn(f"pp: stage {self.stage_index} {what}", stacklevel=4)

    def holds(self, m: int) -> bool:
        """Whether microbatch m's forward was replayed (its backward then must be too)."""
        return m in self._held

    def backward_input(self, m: int, out_grads: list) -> list:
        """I of replayed microbatch m: its input gradients (by input index, None where none)."""
        slot = self._held[m]
        slot.load_grad_outputs(out_grads)
        if slot.bwd is not None:
            slot.bwd.replay()
        return slot.fresh_grad_inputs()

    def backward_weight(self, m: int) -> None:
        """W of replayed microbatch m (after its I): weight gradients into the sums; frees its copy."""
        slot = self._held[m]
        if slot.bwd_w is not None:
            slot.bwd_w.replay()
        self.release(m)

    def release(self, m: int) -> None:
        slot = self._held.pop(m, None)
        if slot is not None:
            self._free[slot.sig].append(slot)

    def reset(self) -> None:
        """End of step: every slot is free again (a failed step may have left some held)."""
        for m in list(self._held):
            self.release(m)

    def discard(self) -> None:
        """Forget the sums of a step that failed, so they do not leak into the next one."""
        if self._dirty:
            torch._foreach_zero_(self._acc)
            self._dirty = False
        self._touched.clear()

    def flush(self) -> None:
        """Add the weight gradients summed by the replayed backwards into `.grad`, and clear the sums."""
        if not self._dirty:
            return
        new, new_src, old, old_src = [], [], [], []
        for k in self._used:
            if k not in self._touched:   # reached only from outputs that got no gradient: stays None
                continue
            p, a = self.grad_of[k], self._acc[k]
            if p.grad is None:
                p.grad = torch.empty_like(a)
                new.append(p.grad)
                new_src.append(a)
            else:
                old.append(p.grad)
                old_src.append(a)
        if new:
            torch._foreach_copy_(new, new_src)
        if old:
            torch._foreach_add_(old, old_src)
        torch._foreach_zero_(self._acc)
        self._dirty = False
        self._touched.clear()

    # ---------------------------------------------------------------------------- capture
    def capture_pending(self) -> None:
        """Capture `slots` copies for each input signature seen since the last call. Runs between steps
        (it synchronises the device); a stage that cannot be captured is left eager, with a warning."""
        pending, self._seen = self._seen, {}
        for sig, sample in pending.items():
            if self.disabled_reason is not None or len(self._graphs) >= self.max_shapes:
                return
            try:
                with torch.cuda.device(self.device):
                    self._capture(sig, sample)
            except Exception as e:  # data-dependent control flow, host syncs, CPU ops inside the stage
                said = str(e) if isinstance(e, _WarmUpFailed) else f"{type(e).__name__}: {e}"
                self.disabled_reason = said.splitlines()[0]
                self._graphs.pop(sig, None)
                self._free.pop(sig, None)
                if not isinstance(e, _WarmUpFailed):
                    _end_failed_capture()
                warnings.warn(f"pp: stage {self.stage_index} cannot be captured as a CUDA graph "
                              f"({self.disabled_reason}); it runs eagerly", stacklevel=2)

    def _capture(self, sig: Signature, sample: list[torch.Tensor]) -> None:
        hooked: list = []
        with capturing(), hooks_seen(hooked.append):
            self._capture_checkpointed(sig, sample)
        if hooked:   # a replay runs no Python: the hooks would be gone from every replayed microbatch
            raise _WarmUpFailed("its forward registers tensor hooks (Tensor.register_hook), which a replayed "
                                "graph would not run")

    def _capture_checkpointed(self, sig: Signature, sample: list[torch.Tensor]) -> None:
        for x in sample:
            if x.is_floating_point():
                x.detach().normal_()
            else:
                x.detach().zero_()    # valid indices for embeddings and gathers
        buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        self._warm_up(sample)
        for name, b in self.module.named_buffers():   # warm-up must not move running statistics
            if name in buffers:
                b.detach().copy_(buffers[name])
        torch.cuda.synchronize()
        slots = [_Slot(sig, self.module, sample, self.names, self.params, self._acc, self.split,
                       self.autocast_dtype, self._touched) for _ in range(self.slots)]
        self._used = sorted(set(self._used) | set(slots[0].used_params))
        self._graphs[sig] = slots
        self._free[sig] = list(slots)

    def _warm_up(self, sample: list[torch.Tensor]) -> None:
        """Run forward and backward twice off the main stream, so lazy initialisation (cuBLAS handles,
        workspaces) happens before capture; weight gradients are computed, not accumulated. The first
        run raises on any host sync (`.item()`, data-dependent shapes), which capture cannot hold:
        such a stage is found here, before a capture could fail half-way."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        mode = torch.cuda.get_sync_debug_mode()
        checkpointed = bool(regions(self.module))
        rng = torch.cuda.get_rng_state(self.device) if checkpointed else None
        with torch.cuda.stream(side):
            for i in range(2):
                aliases = _aliases(self.params)
                _set_sync_debug_mode("error" if i == 0 else mode)
                try:
                    out = [o for o in pytree.tree_leaves(_call(self.module, self.names, aliases, sample,
                                                                self.autocast_dtype))
                           if isinstance(o, torch.Tensor) and o.requires_grad]
                    targets = [x for x in sample if x.requires_grad] + aliases
                    if out:
                        torch.autograd.grad(out, targets, [torch.ones_like(o) for o in out], allow_unused=True)
                except Exception as e:
                    raise _WarmUpFailed(f"{type(e).__name__}: {e}") from e
                finally:
                    _set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(side)
        if checkpointed and not torch.equal(torch.cuda.get_rng_state(self.device), rng):
            torch.cuda.set_rng_state(rng, self.device)
            raise _WarmUpFailed("it draws random numbers (dropout?) inside activation-checkpointed blocks, "
                                "which a captured recompute cannot draw again alike")
