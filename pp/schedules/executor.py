"""The one executor: runs this rank's lowered action list over its stages for one step.

Consecutive send/recv actions form one batch, posted as the groups `groups.split_batch` cuts it into (each
the mirror image of one group of the peer, which NCCL needs); a compute action first waits for the
receives it needs (on GPUs a stream wait, not a host sync). Tensor metadata travels only in steps where
shapes changed (`meta_mode`), as small objects in the same order as the data; otherwise it is cached.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from ..comms import p2p
from ..comms.abort import AbortChannel, peer_lost
from ..stage.outputs import differentiable
from ..stage.runtime import PipelineStage, _meta_of
from .actions import Action, Kind
from .custom_functions import TORCH_TYPE
from .torch_actions import _Action
from .groups import split_batch
from .validate import Message, StageGraph


class _Posted:
    """The work handles of one posted batch; waits once however often asked (gloo hangs on a 2nd wait)."""

    __slots__ = ("works", "abort", "what")

    def __init__(self, works: list, abort: AbortChannel | None = None, what: Callable[[], str] | None = None):
        self.works, self.abort, self.what = works, abort, what

    def wait(self) -> None:
        works, self.works = self.works, []
        if self.abort is not None:  # stops when another rank's step failed (pp.comms.abort)
            self.abort.wait(works, self.what)
            return
        for work in works:
            work.wait()


class Executor:
    """Runs one rank's actions; keeps the metadata caches that outlive a step."""

    def __init__(self, stages: dict[int, PipelineStage], graph: StageGraph, group, rank: int):
        self.stages = stages
        self.graph = graph
        self.group = group
        self.rank = rank
        self.device = next(iter(stages.values())).device
        self._metas: dict[Any, dict[Message, list]] = {}  # meta_key -> forward message -> its metadata
        self._meta: dict[Message, list] = {}
        self._groups: dict[tuple, list] = {}  # (batch, its list's peer_batch) -> split_batch's groups
        self.trace: list[tuple[str, float, float]] = []
        self.abort: AbortChannel | None = None  # set by the schedule
        # {kind: fn(action, ctx)} run in place of pp's own F/B/I/W (pp.schedules.custom_functions)
        self.custom_functions: dict[Kind, Callable[..., None]] = {}
        self.backward_counter: Counter = Counter()   # torch's, for custom functions: cleared every step
        self._context: Any = None
        self._in_step = False
        # set by the schedule on steps whose microbatches are weighted by counted targets (loss_weights)
        self.mask_watch: Any = None

    def rank_of(self, stage: int) -> int:
        return self.graph.stage_to_rank[stage]

    # --------------------------------------------------------------------------------- step
    def run(self, actions: list[Action], *, meta_mode: bool, loss_fn: Callable | None, targets: list | None,
            losses: list | None, loss_scale: float | Sequence[float | torch.Tensor], outputs: list | None, record: bool,
            after: dict[Action, Callable[[], None]] | None = None, meta_key: Any = None,
            model_inputs: tuple[Sequence[tuple], Sequence[dict]] = ((), ()),
            last_backward: Any = (), context: Any = None) -> None:
        """Run `actions`; `after[a]()` is called right after compute action `a` (e.g. start a stage's
        data-parallel gradient sync once its last backward of the step is done). Metadata is cached
        per `meta_key` (e.g. train and eval, whose outputs differ in requiring grad); `meta_mode`
        exchanges it afresh for this key. `loss_scale` seeds each loss's backward: one factor for every
        microbatch, or one per microbatch. `model_inputs`: (args, kwargs) of each microbatch, for the
        first stage's forwards; `last_backward`: the actions that are a stage's last backward of the
        step (torch's `last_backward` flag of the stage's chunk methods); `context`: the
        `_PipelineContext` custom functions are given."""
        if meta_mode:
            self._metas[meta_key] = {}
        self._meta = self._metas.setdefault(meta_key, {})
        self._waits: dict[tuple, list] = defaultdict(list)
        self._grad_bufs: dict[tuple, list] = defaultdict(list)
        self._send_works: list = []
        self._kept: list = []   # tensors of metadata sends in flight
        self._meta_mode = meta_mode
        self._peer_batch = getattr(actions, "peer_batch", None)
        self._loss_fn, self._targets = loss_fn, targets
        # (microbatch, value) as the last stage makes them; handed over in microbatch order at the end
        self._losses = None if losses is None else []
        self._outputs = None if outputs is None else []
        self._loss_scale = loss_scale
        self._model_args, self._model_kwargs = model_inputs
        self._last_backward = last_backward
        self._context = context
        self.backward_counter.clear()
        self._in_step = True
        try:
            self._run(actions, record, after)
        finally:
            self._in_step = False
        # in microbatch order, whatever order the last stage ran them in (an action list of the caller's)
        for got, out in ((self._losses, losses), (self._outputs, outputs)):
            if out is not None:
                out.extend(value for _, value in sorted(got, key=lambda pair: pair[0]))

    def _run(self, actions: list[Action], record: bool, after: dict[Action, Callable[[], None]] | None) -> None:
        self._record = record
        self.trace = []
        events = []
        if record:
            self._origin = self._start_clock()
        batch: list[Action] = []
        for action in actions:
            if action.is_comm:
                batch.append(action)
                continue
            if batch:
                self._post(batch)
                batch = []
            self._compute(action, events if record else None)
            if after and action in after:
                after[action]()
        if batch:
            self._post(batch)
        for work in self._send_works:
            work.wait()
        self._send_works, self._kept = [], []
        if record:
            self.trace = self._resolve(events)

    def _mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _start_clock(self):
        """(host time, device event) taken together, so device timings map onto the host clock that
        every rank of a machine shares (one sync, only in recorded steps)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return time.perf_counter(), self._mark()

    def _resolve(self, events) -> list[tuple[str, float, float]]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            host0, ev0 = self._origin
            base = host0 * 1e6
            return [(n, base + ev0.elapsed_time(s) * 1e3, base + ev0.elapsed_time(e) * 1e3) for n, s, e in events]
        return [(n, s * 1e6, e * 1e6) for n, s, e in events]

    # ------------------------------------------------------------------------------ compute
    def _compute(self, action: Action, events: list | None) -> None:
        """Run one F/B/I/W; its recorded box starts after its receives are done, so waiting shows as idle."""
        s, mb = action.stage, action.microbatch
        stage = self.stages[s]
        try:
            if action.kind == Kind.F:
                self._wait((s, mb, "F"))
            elif action.kind in (Kind.B, Kind.I):
                self._wait((s, mb, "B"))
            start = self._mark() if events is not None else None
            custom = self.custom_functions.get(action.kind) if self.custom_functions else None
            if action.kind == Kind.F:
                self._forward(stage, mb, action if custom is not None else None)
            elif action.kind in (Kind.B, Kind.I):
                self._take_grads(stage, mb)
                if custom is not None:
                    self._run_custom(action, stage)
                else:   # through torch's chunk methods: a stage subclass overriding them runs (pp.stage.chunks)
                    stage.backward_one_chunk(mb, loss=stage.state(mb).loss if stage.is_last else None,
                                             full_backward=action.kind == Kind.B,
                                             last_backward=action in self._last_backward)
                    if self.custom_functions and action.kind == Kind.B:
                        self.backward_counter[s] += 1
                self._route_grads_locally(stage, mb)
            elif action.kind == Kind.W:
                if custom is not None:
                    self._run_custom(action, stage)
                else:
                    stage.backward_weight_one_chunk(mb, last_backward=action in self._last_backward)
                    if self.custom_functions:
                        self.backward_counter[s] += 1
            if events is not None:
                events.append((str(action), start, self._mark()))
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"pp: while running {action} (stage {s}, microbatch {mb}) on pipeline rank {self.rank}")
            raise

    def _scale_of(self, mb: int) -> float | torch.Tensor:
        """The factor microbatch `mb`'s loss gradient is seeded with (one for all, or one per microbatch:
        a number, or a 0-dim tensor on this rank's device)."""
        scale = self._loss_scale
        return scale if isinstance(scale, float) else scale[mb]

    def _run_custom(self, action: Action, stage: PipelineStage) -> None:
        """The user's custom function for `action` (torch's `_Action` and `_PipelineContext`); RuntimeError
        where it returned without computing what the action stands for."""
        mb = action.microbatch
        self.custom_functions[action.kind](_Action(action.stage, TORCH_TYPE[action.kind], mb), self._context)
        st = stage._mb.get(mb)
        if action.kind == Kind.F:
            undone = st is None or not st.outputs
        elif action.kind == Kind.W:
            undone = st is not None and st.pending_weight is not None
        else:
            undone = st is not None and bool(st.outputs)
        if undone:
            method = {Kind.F: "forward_one_chunk", Kind.B: "backward_one_chunk", Kind.I:
                      "backward_one_chunk(..., full_backward=False)", Kind.W: "backward_weight_one_chunk"}[action.kind]
            raise RuntimeError(f"the custom function registered for {TORCH_TYPE[action.kind].name} returned without "
                               f"computing {action} (stage {action.stage}, microbatch {mb}): it must call "
                               f"stage.{method} for the action's stage and microbatch")

    def compute_loss(self, stage: PipelineStage, mb: int, output: Any) -> None:
        """The last stage's loss of microbatch `mb` from its `output` with the step's loss_fn and target
        (kept for its backward and the step's losses); nothing in a step without a loss. RuntimeError
        outside a step."""
        if not self._in_step:
            raise RuntimeError("_maybe_compute_loss is for custom functions while step() runs them")
        if self._loss_fn is None or self._targets is None:
            return
        st = stage.state(mb)
        target, watch = self._targets[mb], self.mask_watch
        seen = watch.before(target) if watch is not None else None
        st.loss, st.scale = _call_loss(stage, self._loss_fn, output, target), self._scale_of(mb)
        if seen is not None:
            watch.after(seen, mb)
        if self._losses is not None:
            self._losses.append((mb, st.loss.detach()))

    def _forward(self, stage: PipelineStage, mb: int, custom: Action | None = None) -> None:
        st = stage.state(mb)
        for i, x in enumerate(st.inputs):
            flag = getattr(x, "_pp_requires_grad", None)
            if flag is not None:
                del x._pp_requires_grad
                if flag and torch.is_grad_enabled():
                    x.requires_grad_(True)
        if custom is not None:   # the user's function in place of the forward (it may compute the loss)
            self._run_custom(custom, stage)
            final = st.final
        elif stage.is_first:
            final = stage.forward_one_chunk(mb, self._model_args[mb], self._model_kwargs[mb])
        else:   # a later stage: its rank's step keywords, as torch gives them (a manual stage takes them)
            final = stage.forward_one_chunk(mb, (), self._model_kwargs[mb] if self._model_kwargs else None)
        outputs = st.outputs
        if stage.is_last:   # the loss and the output as forward_one_chunk returned them (torch's runtime)
            if custom is None or st.loss is None:
                self.compute_loss(stage, mb, final)
            if self._outputs is not None:
                if torch.is_grad_enabled():  # kept for the caller only: no autograd graph held by it
                    final = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, final)
                self._outputs.append((mb, final))
        for c in stage.consumers:
            if self.rank_of(c) != self.rank:
                continue
            consumer = self.stages[c]
            idx = stage.output_indices_for(c, mb)
            for slot, i in zip(consumer.input_slots_from(stage.stage_index, len(idx)), idx):
                v = outputs[i]
                if isinstance(v, torch.Tensor):
                    v = v.detach().requires_grad_(v.requires_grad and torch.is_grad_enabled())
                consumer.set_input(mb, slot, v)

    def _route_grads_locally(self, stage: PipelineStage, mb: int) -> None:
        for p in stage.producers:
            if self.rank_of(p) != self.rank:
                continue
            producer = self.stages[p]
            idx = producer.output_indices_for(stage.stage_index, mb)
            for slot, i in zip(stage.input_slots_from(p, len(idx)), idx):
                producer.add_output_grad(mb, i, stage.input_grad(mb, slot))

    def _wait(self, key: tuple) -> None:
        for work in self._waits.pop(key, ()):
            work.wait()

    # --------------------------------------------------------------------------------- comm
    def _post(self, batch: list[Action]) -> None:
        """Post a run of comm actions as the groups `split_batch` cuts it into (each the mirror image of
        one group of each peer, as NCCL needs). In a metadata step each group's forward messages first
        exchange their metadata, in the group's canonical order (the peer's order too), then its data
        goes out as one group, before the next group's blocking metadata receive can hold it back; on CPU
        the group's sends to peers it receives nothing from go first (`_sends_first`)."""
        key = (tuple(batch), id(self._peer_batch))
        groups = self._groups.get(key)
        if groups is None:   # the same batches come every step: cut each once
            groups = self._groups[key] = split_batch(batch, self.graph, self.rank_of, self._peer_batch)
        try:
            for group in groups:
                if self._meta_mode and self._sends_first_ok():
                    early = self._sends_first(group)
                    if early:
                        self._post_group(early, early=True)
                        group = [x for x in group if x not in early]
                self._post_group(group)
        except Exception as e:
            lost = peer_lost(e, self.rank, self._what(batch))
            if lost is not None:   # gloo may fail the posting itself once the peer is gone
                raise lost from e
            if hasattr(e, "add_note"):
                e.add_note(f"pp: while posting {' '.join(map(str, batch))} on pipeline rank {self.rank}")
            raise

    def _post_group(self, group: list, early: bool = False) -> None:
        """Post one group's transfers; `early` (a metadata step's sends posted first, `_sends_first`): their
        metadata is left in flight, waited for at the end of the step."""
        sends, recvs, keys = [], [], []
        for action, msg in group:
            if action.kind == Kind.SEND_F:
                sends += self._send_forward(msg, early)
            elif action.kind == Kind.SEND_B:
                sends += self._send_backward(msg)
            else:
                got = self._recv_forward(msg) if action.kind == Kind.RECV_F else self._recv_backward(msg)
                recvs += got
                if got:
                    keys.append((msg.dst, msg.microbatch, "F" if action.kind == Kind.RECV_F else "B"))
        self._issue(sends, recvs, keys, group)

    def _sends_first_ok(self) -> bool:
        """Whether a metadata step may post a group's sends before its receives, their metadata left in
        flight: on CPU (gloo), with pp's stop channel and without strict matching. (NCCL keeps each group
        whole; not measured on three GPUs or more.)"""
        return self.abort is not None and self.abort.blocking and not p2p.is_strict()

    def _sends_first(self, group: list) -> list:
        """In a metadata step, the group's sends to peers it receives nothing from: they go out (metadata
        and data) before the group's blocking metadata receives. Otherwise, with three ranks or more, a
        rank waiting for one peer's metadata held back the data another peer needs before that first peer
        can send (a ring: 0 -> 1 -> 2 -> 0; found with loop schedules of fewer microbatches than ranks and
        with torch's CSV files), and the step hung. Sends to a peer the group also receives from stay in
        it; with two ranks nothing changes."""
        recv_peers = {self.rank_of(m.src) for a, m in group if a.kind in (Kind.RECV_F, Kind.RECV_B)}
        early = [(a, m) for a, m in group
                 if a.kind in (Kind.SEND_F, Kind.SEND_B) and self.rank_of(m.dst) not in recv_peers]
        return early if recv_peers and early else []

    def _what(self, actions: list[Action], note: str = "") -> Callable[[], str]:
        """A label for the watchdog and the abort line: the actions, read only when a wait goes wrong."""
        rank = self.rank
        return lambda: f"{' '.join(map(str, actions))}{note} on pipeline rank {rank}"

    def _issue(self, sends: list, recvs: list, keys: list, group: list) -> None:
        if not sends and not recvs:
            return
        rank = self.rank
        label = lambda: f"{' '.join(str(a) for a, _ in group)} on pipeline rank {rank}"  # noqa: E731 - read on a hang
        handle = _Posted(p2p.post(sends, recvs, self.group, label), self.abort, label)
        for key in keys:
            self._waits[key].append(handle)
        if sends:
            self._send_works.append(handle)  # keeps sent tensors alive until the step ends

    def _send_forward(self, msg: Message, early: bool = False) -> list:
        stage = self.stages[msg.src]
        st = stage.state(msg.microbatch)
        values = [st.outputs[i] for i in stage.output_indices_for(msg.dst, msg.microbatch)]
        meta = [_meta_of(v) for v in values]
        peer = self.rank_of(msg.dst)
        if self._meta_mode:
            what = self._what([Action(msg.src, Kind.SEND_F, msg.microbatch)], " (its metadata)")
            if self.abort is not None:
                pending = self.abort.send_object(meta, peer, what, wait=not early)
                if pending is not None:   # waited for at the end of the step, with the data sends
                    self._send_works.append(_Posted(pending[0], self.abort, what))
                    self._kept.append(pending[1])
            else:
                p2p.send_object(meta, peer, self.group, what)
            self._meta[msg] = meta
        elif self._meta.get(msg) != meta:
            raise RuntimeError(
                f"stage {msg.src} output for stage {msg.dst} (microbatch {msg.microbatch}) changed from "
                f"{self._meta.get(msg)} to {meta} without a change in the pipeline's input shapes; "
                f"outputs whose shape or non-tensor value depends on the data are not supported"
            )
        return [(v.detach().contiguous(), peer) for v in values if isinstance(v, torch.Tensor)]

    def _recv_forward(self, msg: Message) -> list:
        stage = self.stages[msg.dst]
        peer = self.rank_of(msg.src)
        if self._meta_mode:
            what = self._what([Action(msg.dst, Kind.RECV_F, msg.microbatch)], " (its metadata)")
            self._meta[msg] = (self.abort.recv_object(peer, what) if self.abort is not None
                               else p2p.recv_object(peer, self.group, what))
            stage.check_received(msg.src, self._meta[msg])
        meta = self._meta[msg]
        ops = []
        for slot, entry in zip(stage.input_slots_from(msg.src, len(meta)), meta):
            if entry[0] == "t":
                _, shape, dtype, requires_grad = entry
                buf = torch.empty(shape, dtype=dtype, device=stage.device)
                buf._pp_requires_grad = requires_grad
                stage.set_input(msg.microbatch, slot, buf)
                ops.append((buf, peer))
            else:
                stage.set_input(msg.microbatch, slot, entry[1])
        return ops

    def _send_backward(self, msg: Message) -> list:
        """The gradients of the consumer's inputs from `msg.dst`, for the producer. An input the consumer
        did not use has none (its producer's parameters that only feed it keep `.grad` None, as in the
        unsplit model): a metadata step sends zeros for it and a flag per gradient saying which exist;
        later steps send only those."""
        stage = self.stages[msg.src]          # the consumer, sending grads of its inputs back
        fwd = self._meta[Message(False, msg.dst, msg.src, msg.microbatch)]
        peer = self.rank_of(msg.dst)
        grads, entries = [], []
        for slot, entry in zip(stage.input_slots_from(msg.dst, len(fwd)), fwd):
            if entry[0] == "t" and entry[3]:
                grads.append(stage.input_grad(msg.microbatch, slot))
                entries.append((slot, entry))
        if self._meta_mode:
            used = [g is not None for g in grads]
            self._meta[msg] = used
            out = [(g.contiguous() if g is not None else _zeros(e, stage.device), peer)
                   for g, (_, e) in zip(grads, entries)]
            if out:
                out.append((torch.tensor(used, dtype=torch.uint8, device=stage.device), peer))
            return out
        used = self._meta.get(msg) or [True] * len(grads)
        out = []
        for g, (slot, entry), u in zip(grads, entries, used):
            if u:   # used then, not now (a data-dependent use): zeros, as the producer waits for them
                out.append((g.contiguous() if g is not None else _zeros(entry, stage.device), peer))
            elif g is not None:
                raise RuntimeError(
                    f"stage {msg.src} used its input {slot} from stage {msg.dst} (microbatch {msg.microbatch}) "
                    f"this step but not in the step that set the pipeline's metadata, so its producer does "
                    f"not wait for a gradient of it (the gradient would be lost): inputs whose use depends "
                    f"on the data are not supported; use every input in every step (e.g. add 0 * x.sum())")
        return out

    def _recv_backward(self, msg: Message) -> list:
        stage = self.stages[msg.dst]          # the producer, receiving grads of its outputs
        mb = msg.microbatch
        st = stage.state(mb)
        peer = self.rank_of(msg.src)
        used = None if self._meta_mode else self._meta.get(msg)
        pairs = []
        for i in stage.output_indices_for(msg.src, mb):
            out = st.outputs[i]
            if differentiable(out):
                # contiguous, as the consumer sends it: empty_like would keep a transposed or
                # channels_last output's strides (gloo refuses such a buffer; NCCL fills it in the wrong order)
                buf = torch.empty(out.shape, dtype=out.dtype, device=out.device)
                pairs.append((i, buf))
        if used is not None:   # the consumer sends only the gradients it has (see _send_backward)
            pairs = [p for p, u in zip(pairs, used) if u]
        ops = [(buf, peer) for _, buf in pairs]
        flags = None
        if self._meta_mode and pairs:
            flags = torch.empty(len(pairs), dtype=torch.uint8, device=stage.device)
            ops.append((flags, peer))
        if pairs:
            self._grad_bufs[(msg.dst, mb)].append((msg, pairs, flags))
        return ops

    def _take_grads(self, stage: PipelineStage, mb: int) -> None:
        """Hand microbatch `mb`'s received output gradients to the producer `stage`; in a metadata step
        the consumer's flags say which exist (kept for later steps, which receive only those)."""
        for msg, pairs, flags in self._grad_bufs.pop((stage.stage_index, mb), ()):
            if flags is not None:
                used = [bool(u) for u in flags.tolist()]
                self._meta[msg] = used
                pairs = [p for p, u in zip(pairs, used) if u]
            for idx, buf in pairs:
                stage.add_output_grad(mb, idx, buf)


def _zeros(entry: tuple, device: torch.device) -> torch.Tensor:
    """Zeros shaped as the tensor a forward metadata `entry` describes."""
    _, shape, dtype, _ = entry
    return torch.zeros(shape, dtype=dtype, device=device)


def _call_loss(stage: PipelineStage, loss_fn: Callable, output: Any, target: Any) -> torch.Tensor:
    """`loss_fn(output, target)` under the autocast the stage's forward ran in (bf16-mixed), as in the
    usual unsplit loop `with autocast: loss = loss_fn(model(x), y)`. TypeError where it is not one
    tensor (a dict or tuple of losses: return their weighted sum, and log the parts yourself)."""
    if stage.autocast:
        with torch.autocast(stage.device.type, dtype=stage.activation_dtype):
            loss = loss_fn(output, target)
    else:
        loss = loss_fn(output, target)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a single-element tensor (the loss to backpropagate), got "
                        f"{type(loss).__name__}; return one tensor, e.g. the weighted sum of the parts")
    if (not loss.requires_grad or loss.grad_fn is None) and torch.is_grad_enabled() and any(
            t.requires_grad for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)):
        raise RuntimeError("loss_fn returned a loss that does not require grad (or is a leaf) although the stage's "
                           "output does, so backward would train nothing: it cut the graph (.detach(), .item(), "
                           "torch.no_grad(), a numpy round trip, or a new tensor built from values)")
    return loss
