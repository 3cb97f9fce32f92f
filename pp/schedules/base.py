"""The step logic every schedule class shares (`pp.schedules.classes`): check the inputs on every rank
before any transfer, exchange metadata, weight the microbatches' losses, run the action list through the
executor, then finish the gradients (shared parameters, CUDA graphs, DDP/FSDP-wrapped stages).
"""
from __future__ import annotations

import functools
import json
import zlib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ..comms import p2p
from ..comms.backend import close_at_exit, transfers_may_be_pending
from ..comms.abort import AbortChannel, PipelineAborted
from ..microbatch import (check_merge_spec, check_rows_follow, class_id_tensors, loss_reduction, loss_scales,
                          merge_chunks, split_sizes, split_target_like)
from ..parallel.wrapped import StepSync
from ..stage.graphs import StageGraphs
from ..stage.runtime import PipelineStage
from .actions import Action, Kind, in_flight_peak, last_backward_actions
from .caller_graph import backward_into_caller, cut_caller_graph
from .executor import Executor
from .split_batch import batch_split_dim, own_versions, split_batch, split_target, target_split_dim
from .groups import RankActions, check_groups, peer_batches
from .custom_functions import CustomFunctions, _PipelineContext
from .compat import check_model_keywords, first_backward, pipeline_order, warn_forward_only
from .lower import lower
from .user_lists import UserLists, copy_order, placement_of
from .loss_weights import MaskWatch, token_shares, warn_ambiguous_class_ids, warn_labels_mean, warn_unstated_reduction
from .simulate import DEFAULT_COSTS
from .registry import get_spec
from .rng import rank_streams
from .shared_grads import keep_one_accumulated, sync_shared_grads
from .validate import stage_graph, validate

_OPENING = "the step's opening agreement (where every rank says whether it can run the step)"
# seconds a rank waits there for the others before it says so (gloo; a module attribute tests lower)
AGREEMENT_NOTICE_S = 60.0


class _PipelineSchedule(CustomFunctions, UserLists):
    """Common step logic: check inputs on every rank before any transfer, then run the action list."""

    _name: str = ""

    def __init__(self, stages: PipelineStage | Sequence[PipelineStage], n_microbatches: int,
                 loss_fn: Callable | None = None, args_chunk_spec: Any = None, kwargs_chunk_spec: Any = None,
                 output_merge_spec: Any = None, scale_grads: bool = True,
                 actions: Mapping[int, Sequence[Action]] | None = None,
                 rows: Mapping[int, Sequence[Any]] | None = None, backward_requires_autograd: bool = True,
                 defer_pp_recv: bool = False):
        if getattr(type(self), "_step_microbatches", None) is not None:   # pp's classes define none
            raise NotImplementedError(
                f"{type(self).__name__} overrides _step_microbatches, which pp never calls: pp runs every schedule "
                f"from action lists. Write the order as lists (assign self.pipeline_order in __init__, or "
                f"load_csv; docs/schedules.md), or subclass PipelineStage and override forward_one_chunk / "
                f"backward_one_chunk to change what runs for each microbatch")
        stages = [stages] if isinstance(stages, PipelineStage) else list(stages)
        self._init_args = (stages, n_microbatches, loss_fn, args_chunk_spec, kwargs_chunk_spec,
                           output_merge_spec, scale_grads)   # for _load_csv
        for name, flag in (("scale_grads", scale_grads), ("backward_requires_autograd", backward_requires_autograd),
                           ("defer_pp_recv", defer_pp_recv)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        # torch's knobs, taken for code moving over (and passed on by _load_csv): pp's backward always runs
        # through autograd (step() needs gradients enabled either way), and pp posts receives where its
        # plan puts them.
        self._init_kwargs = {"backward_requires_autograd": backward_requires_autograd,
                             "defer_pp_recv": defer_pp_recv}
        if not stages or not all(isinstance(s, PipelineStage) for s in stages):
            raise TypeError(f"{type(self).__name__} needs PipelineStage objects, got {stages!r}")
        if not isinstance(n_microbatches, int) or isinstance(n_microbatches, bool) or n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive integer, got {n_microbatches!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        first = stages[0]
        self.group, self.rank, self.n_ranks = first.group, first.group_rank, first.group_size
        self.n_stages = first.num_stages
        self.n_microbatches = n_microbatches
        self._loss_fn = loss_fn
        self._args_chunk_spec, self._kwargs_chunk_spec = args_chunk_spec, kwargs_chunk_spec
        self._batch_dim = batch_split_dim(args_chunk_spec, kwargs_chunk_spec)   # the target follows it
        self._output_merge_spec = output_merge_spec
        self.scale_grads = scale_grads
        self._warned_forward_only = False   # step() without a loss_fn given backward lists or a target
        self._warned_reduction = False   # an uneven split met a loss_fn that states no reduction (warned once)
        self._warned_class_ids = False   # a target of several integer tensors: weighted by rows (warned once)
        self._labels_checks = 3   # steps left in which labels= passed to the model is checked (warn_labels_mean)
        # the first steps weighted by counted targets: does loss_fn change the count by masking in place?
        self._mask_watch = MaskWatch()
        self._merge_checked = False   # output_merge_spec checked against the traced output (once)
        self._count_group = None   # pp.parallelize at dp > 1: the replicas whose counted targets a token mean spans
        # pp.parallelize at dp x tp > 1: (group of every rank, this pipeline's index, pipelines): all pipelines
        # agree on each training step, so that one refusing its batch stops the others before their collectives
        self._agree: tuple | None = None
        self._stages = {s.stage_index: s for s in stages}
        info = first.pipe_info
        edges = info.edges if info is not None else {s: [s + 1] for s in range(self.n_stages - 1)}

        if actions is None and not self._name:   # a base class, as torch's: actions come from _load_csv
            self._awaiting_actions = True        # or from assigning pipeline_order (torch's test zoo)
            self._pipeline_order, self._pipeline_order_with_comms = {}, {}
            self._loaded_orders: tuple[dict, dict] = ({}, {})   # as loaded: edits in place are seen at a step
            self._plan = (f"{type(self).__name__} with no action lists (neither pipeline_order assigned nor "
                          f"_load_csv called)")
            self._plan_hash = zlib.crc32(self._plan.encode())
            return
        self._awaiting_actions = False
        if actions is None:
            spec = get_spec(self._name)
            if spec.stages_per_rank is not None and self.n_stages != spec.stages_per_rank * self.n_ranks:
                raise ValueError(f"{self._name} runs {spec.stages_per_rank} stage(s) per rank: with "
                                 f"{self.n_ranks} ranks it needs {spec.stages_per_rank * self.n_ranks} stages, "
                                 f"but the stages say num_stages={self.n_stages}")
            if spec.stages_per_rank is None and self.n_stages % self.n_ranks:
                raise ValueError(f"{self._name} needs a multiple of {self.n_ranks} stages (one or more per "
                                 f"rank) for {self.n_ranks} ranks; got num_stages={self.n_stages}")
            placement = spec.placement(self.n_stages, self.n_ranks)
            compute = spec.generate(self.n_stages, self.n_ranks, n_microbatches)
        else:
            compute = {r: [a for a in acts if a.is_compute] for r, acts in actions.items()}
            placement = placement_of(actions, self.n_stages, self.n_ranks)
        self.stage_to_rank = list(placement)
        mine = sorted(s for s, r in enumerate(placement) if r == self.rank)
        if sorted(self._stages) != mine:
            raise ValueError(f"rank {self.rank} passed stages {sorted(self._stages)} but this schedule places "
                             f"stages {mine} on it (stage_to_rank={self.stage_to_rank})")
        for s in self._stages.values():
            s.stage_to_rank = self.stage_to_rank
        has_comm = actions is not None and any(a.is_comm for acts in actions.values() for a in acts)
        self._train_actions = self._prepare(compute, edges, actions if has_comm else None)
        self._pipeline_order = pipeline_order(compute, rows, self.stage_to_rank, edges)
        self._check_given_placement()
        fwd = {r: [a for a in acts if a.kind == Kind.F] for r, acts in compute.items()}
        self._eval_actions = self._prepare(fwd, edges, None, forward_only=True)
        # What every rank must agree on, as one number checked at each step (ranks built with other
        # schedules, microbatch counts or stage counts would otherwise wait on each other forever)
        self._plan_hash = zlib.crc32(repr((n_microbatches, self.n_stages, self.stage_to_rank, sorted(
            (r, [str(a) for a in acts]) for r, acts in compute.items()))).encode())
        self._plan = (f"{type(self).__name__} with {n_microbatches} microbatches over {self.n_stages} stages "
                      f"placed {self.stage_to_rank}, action lists #{self._plan_hash:08x}")
        self._loaded_orders = (copy_order(self._pipeline_order), copy_order(self._pipeline_order_with_comms))
        # step() without a loss_fn warns where lists the user wrote hold a backward (found once per load)
        self._backward_cell = None if self._name else first_backward(self._pipeline_order)
        self._graph = stage_graph(self.stage_to_rank, edges)
        self._executor = Executor(self._stages, self._graph, self.group, self.rank)
        self._executor.abort = self._abort = AbortChannel(self.group, self.rank, first.device)
        p2p.warm_up(self.group, first.device)
        close_at_exit()
        self._shared_checked = False   # shared parameters' copies are checked equal at the first step
        self._broken = ""   # why a step failed mid-way (another one could meet its pending transfers)
        self._broken_own = False   # ... by this rank's own error, not by stopping to wait for another's
        self._grad_flags: dict[tuple, tuple] = {}   # mode -> requires_grad of this rank's parameters
        self._signatures: dict[tuple, Any] = {}   # (training, grad enabled, stage modes) -> input shapes last sent so
        self.record_trace = False
        # Called with a stage index right after that stage's last backward (B or W) of a training step
        # has run on this rank, e.g. to start its data-parallel gradient sync while others still work.
        self.on_backward_done: Callable[[int], None] | None = None
        self._last_backward = last_backward_actions(self._train_actions)
        self._graphs: dict[int, StageGraphs] = {}
        self._compilers: dict = {}     # stage -> its CompileCounter, set by compile()
        self._compile_mode: str | None = None
        self._after: tuple[Any, dict] = (None, {})   # (hook it was built for, {action: callable})
        # Stage modules wrapped by DDP / FSDP2: their gradient sync, once per step (pp/parallel/wrapped.py).
        self._dp_wrapped = StepSync.of(self._stages.values())

    def _prepare(self, compute, edges, given, forward_only=False) -> list[Action]:
        lists = dict(given) if given is not None else lower(
            compute, self.stage_to_rank, self.n_microbatches, edges, costs=DEFAULT_COSTS)
        graph = stage_graph(self.stage_to_rank, edges)
        if not forward_only:
            validate(lists, self.stage_to_rank, self.n_microbatches, edges)
            check_groups(lists, graph)
            # rank -> the list it runs, sends and receives included (torch's name for it)
            self._pipeline_order_with_comms = {r: list(acts) for r, acts in sorted(lists.items())}
        return RankActions(lists.get(self.rank, []), peer_batches(lists, graph, self.rank))

    # ------------------------------------------------------------------------------- public
    def step(self, *args, target=None, losses: list | None = None, return_outputs: bool = True,
             loss_kwargs: dict | None = None, **kwargs) -> Any:
        """One training step over the batch: forward and backward of every microbatch (as torch's).

        The rank holding stage 0 passes the batch (`args`, and `kwargs` that are parameters of the
        model's forward); the rank holding the last stage passes `target`; `losses` (a list) is cleared
        and gets one loss per microbatch there. Returns the merged output of the last stage on its rank
        (None elsewhere, and with `return_outputs=False`, which saves keeping every microbatch's
        output). `loss_kwargs` go to every `loss_fn(output, target, **loss_kwargs)` call. Without
        `loss_fn` this runs forward only. Keywords that are neither these nor parameters of the model's
        forward are refused with a TypeError on the rank that got them, and every other rank raises
        too, before any transfer.
        """
        training = self._loss_fn is not None
        if not training and not self._warned_forward_only:   # once per schedule: no gradients, said aloud
            self._warned_forward_only = warn_forward_only(self._backward_cell,
                                                          target is not None and self.n_stages - 1 in self._stages)
        return self._run(args, kwargs, target, losses, training, return_outputs, loss_kwargs)

    def eval(self, *args, target=None, losses: list | None = None, return_outputs: bool = True,
             loss_kwargs: dict | None = None, **kwargs) -> Any:
        """Forward only, without gradients; returns the merged output on the last stage's rank.

        With a `loss_fn` and `target` (on the last stage's rank), `losses` is cleared and gets one loss
        per microbatch, as in torch. Keywords as in `step()`.
        """
        with torch.no_grad():
            return self._run(args, kwargs, target, losses, False, return_outputs, loss_kwargs)

    def enable_cuda_graphs(self, max_shapes: int = 4) -> None:
        """Replay each stage's forward and backward as CUDA graphs from the second training step on.

        For stages whose host time (kernel launches) exceeds their GPU time: small layers, short
        sequences. Each stage keeps one graph copy per microbatch it can have in flight, so activation
        memory is what the eager run holds at its peak, plus one set of weight-gradient sums. Inputs of up
        to `max_shapes` different shapes are captured (each new one at the end of the step that saw it);
        other shapes, eval and forward-only steps run eagerly. Parameters must stay where they are
        (in-place optimizer updates are fine; `module.to()` after this is not). Schedules that split
        backward into input and weight gradients (I/W) get two backward graphs per copy.
        """
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be a positive integer, got {max_shapes!r}")
        if self._compilers:
            from ..stage.compiled import check_with_cuda_graphs
            check_with_cuda_graphs(self._compile_mode)
        for s in self._stages.values():
            if s.device.type != "cuda":
                raise ValueError(f"CUDA graphs need stages on a CUDA device; stage {s.stage_index} is on "
                                 f"{s.device}")
        for i, s in self._stages.items():
            if s.graphs is None:
                with torch.cuda.device(s.device):
                    split = any(a.stage == i and a.kind in (Kind.I, Kind.W) for a in self._train_actions)
                    s.graphs = StageGraphs(s.submod, in_flight_peak(self._train_actions, i), i, s.device,
                                           max_shapes, split=split,
                                           autocast_dtype=s.activation_dtype if s.autocast else None,
                                           weights=s.bf16_weights)
            self._graphs[i] = s.graphs
        self._after = (None, {})

    def compile(self, mode: str | None = None, per: str | None = None, dynamic: bool | None = None,
                backend: str = "inductor") -> None:
        """Run each stage's forward and backward through `torch.compile`, per block (`per="block"`: each
        child of the repeated container the splitter cuts, as activation checkpointing finds them) or per
        stage (`per="stage"`; None, the default: per stage, per block where the stage is checkpointed,
        the faster of the two measured); traced and manual stages, every schedule. Compiles happen at first use, once
        per new input shape (`compile_count`). `mode`: inductor's (None: default); `dynamic` as in
        torch.compile. In I/W-split schedules a compiled region's weight gradients are computed in I
        with its input gradients (one fused backward) and W does only the eager rest (pp.stage.compiled).
        ValueError for a bad argument, a second call, or a mode that captures CUDA graphs itself together
        with `enable_cuda_graphs()`."""
        from ..stage.compiled import compile_stages
        if self._compilers:
            raise ValueError("compile() ran on this schedule already")
        split = any(a.kind in (Kind.I, Kind.W) for a in self._train_actions)
        self._compilers = compile_stages(self._stages, split, mode, per, dynamic, backend)
        self._compile_mode = mode

    @property
    def compile_count(self) -> int:
        """Graphs compiled so far for this rank's stages (0 without `compile()`); grows once per new
        input shape (and per graph break), not per step."""
        return sum(c.count for c in self._compilers.values())

    @property
    def cuda_graph_replays(self) -> dict[int, int]:
        """{stage on this rank: microbatches replayed so far}; empty without `enable_cuda_graphs()`."""
        return {i: g.replays for i, g in self._graphs.items()}

    def trace_events(self) -> list[dict]:
        """Per-action timings of the last step run with `record_trace = True` (Chrome trace events)."""
        return [{"name": n, "ph": "X", "ts": s, "dur": max(e - s, 0.0), "pid": self.rank, "tid": 0}
                for n, s, e in self._executor.trace]

    def write_trace(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"traceEvents": self.trace_events()}, f)

    # ----------------------------------------------------------------------------- internal
    def _mode_key(self, training: bool) -> tuple:
        """What metadata and checked input shapes are kept per: step or eval, grad on or off, the
        stages' train/eval modes (a graph traced in the other mode may take other shapes), and the
        caller's autocast (it changes the dtypes stages send)."""
        kind = self._executor.device.type
        cast = tuple((torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in {"cpu", kind})
        return (training, torch.is_grad_enabled(), tuple(st.submod.training for st in self._stages.values()),
                cast)

    def _check_inputs(self, args, kwargs, target, losses, training, return_outputs, loss_kwargs):
        n = self.n_microbatches
        mb_args = mb_kwargs = targets = None
        signature = None
        caller_graph: list = []   # inputs that carry the caller's graph: (original, leaf)
        rows = [0, 0]   # the batch's and the target's rows, where this rank holds them
        if not isinstance(return_outputs, bool):
            raise TypeError(f"return_outputs must be True or False, got {return_outputs!r}")
        if loss_kwargs is not None and not isinstance(loss_kwargs, dict):
            raise TypeError(f"loss_kwargs must be a dict of keyword arguments for loss_fn, got "
                            f"{type(loss_kwargs).__name__}")
        if losses is not None and not isinstance(losses, list):
            raise TypeError(f"losses must be a list to append to, got {type(losses).__name__}")
        if training and not torch.is_grad_enabled():
            raise RuntimeError("step() runs backward and needs gradients enabled; it was called under "
                               "torch.no_grad(): call eval() instead")
        check_model_keywords(self._stages, kwargs)
        for stage in self._stages.values():   # a traced graph holds the train/eval mode it was traced in
            stage.sync_mode()
        if 0 in self._stages:
            if not args and not kwargs:
                raise ValueError(f"rank {self.rank} holds the first stage: pass the batch to step()/eval()")
            stage0 = self._stages[0]
            if training:
                args, kwargs, caller_graph = cut_caller_graph(args, kwargs)
            if stage0.pipe_info is not None:
                args, kwargs = stage0.pipe_info.input_binder.normalise(args, kwargs)
            mb_args, mb_kwargs, rows[0] = split_batch(tuple(args), dict(kwargs), n, self._args_chunk_spec,
                                                      self._kwargs_chunk_spec)
            # whether an input requires grad changes what the stages send on (a skip connection of it, a
            # frozen first stage): part of the signature, so a change exchanges metadata afresh
            signature = tuple((tuple(x.shape), x.dtype, x.requires_grad) if isinstance(x, torch.Tensor) else repr(x)
                              for chunk in zip(mb_args, mb_kwargs)
                              for x in torch.utils._pytree.tree_leaves(chunk))
            if stage0.pipe_info is None and stage0.input_args is not None:
                for a in mb_args:
                    stage0.check_manual_inputs(tuple(a))
            if stage0.pipe_info is not None and signature != self._signatures.get(self._mode_key(training)):
                for a, k in zip(mb_args, mb_kwargs):  # before any rank sends: shapes the graph cannot take
                    stage0.check_model_inputs(stage0.pipe_info.input_binder.flatten(a, k))
        elif kwargs and any(st.pipe_info is None for st in self._stages.values()):
            # torch gives a rank's step() keywords to each of its stages: a later manual stage takes those its
            # forward takes (their shapes are part of the signature, as the first stage's inputs are)
            spec = self._kwargs_chunk_spec
            if isinstance(spec, dict):
                spec = {k: v for k, v in spec.items() if k in kwargs}
            _, mb_kwargs, _ = split_batch((), dict(kwargs), n, None, spec)
            signature = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                              for x in torch.utils._pytree.tree_leaves(mb_kwargs))
        last = self.n_stages - 1
        if last in self._stages and return_outputs and self._output_merge_spec is not None and not self._merge_checked:
            example = self._stages[last].output_example()   # before any rank sends: a spec that cannot merge
            if example is not None:
                check_merge_spec(self._output_merge_spec, example)
                self._merge_checked = True
        if last in self._stages and self._loss_fn is not None:
            if target is None and (training or losses is not None):
                raise ValueError(f"rank {self.rank} holds the last stage and the schedule has a loss_fn: "
                                 f"pass target= to {'step' if training else 'eval'}()")
            if target is not None:
                targets, rows[1] = split_target(target, n, self._batch_dim)
        return mb_args, mb_kwargs, targets, signature, rows, caller_graph

    def _refuse_other_plans(self, training: bool, group: Any) -> None:
        plans = [None] * dist.get_world_size(group)
        dist.all_gather_object(plans, f"{'step' if training else 'eval'} of {self._plan}", group=group)
        raise ValueError("the ranks disagree on the pipeline, so they would wait on each other forever: "
                         + "; ".join(f"rank {r} calls {p}" for r, p in enumerate(plans))
                         + " (every rank must build the same schedule and call the same method)")

    @staticmethod
    def _refusal_reason(who: int, me: int, error: BaseException | None, group: Any) -> str:
        """Every rank of `group` learns why rank `who` refused the step (its error's text): all call this,
        as all saw the refusal in the step's opening agreement. A host round trip, on this path only."""
        texts: list[Any] = [None] * dist.get_world_size(group)
        mine = f"{type(error).__name__}: {error}" if error is not None and me == who else None
        dist.all_gather_object(texts, (me, mine), group=group)
        return next((t for r, t in texts if r == who and t), "its own error says why")

    def _rebuild(self, actions: Mapping[int, Sequence[Action]], rows: Mapping[int, Sequence[Any]]) -> None:
        """Build this schedule again from user-written lists (the base constructor, not a subclass's)."""
        _PipelineSchedule.__init__(self, *self._init_args, actions=actions, rows=rows, **self._init_kwargs)

    def _refuse_without_lists(self, training: bool, error: BaseException | None) -> None:
        """A schedule with no action lists takes part in the step's opening agreement before it raises, so
        that ranks which do have lists stop too (rather than wait for it forever)."""
        if self.n_ranks > 1:
            plan = 2 * self._plan_hash + int(training)
            status = p2p.max_all_reduce([self.rank + 1, 0, 0, plan, -plan, 0, 0], self.group, _OPENING,
                                         AGREEMENT_NOTICE_S)
            if status[3] != -status[4]:
                self._refuse_other_plans(training, self.group)
        if error is None:
            error = RuntimeError(f"{type(self).__name__} has no schedule of its own: assign its pipeline_order "
                                 f"(or load a CSV file with _load_csv(path)) on every rank first, or use "
                                 f"pp.schedule_from_actions or a schedule class")
        if self.n_ranks > 1 and not status[2]:   # the peers raise naming this reason (as _run orders its checks)
            self._refusal_reason(status[0] - 1, self.rank, error, self.group)
        raise error

    def _run(self, args, kwargs, target, losses, training, return_outputs=True, loss_kwargs=None):
        error, prepared = None, None
        # lists the user wrote (a base class: torch re-reads them at each step) may have been edited in
        # place; generated schedules are not re-read (nor are torch's), so they skip the comparison
        if not self._name and (self._pipeline_order != self._loaded_orders[0]
                               or self._pipeline_order_with_comms != self._loaded_orders[1]):
            try:   # edited in place since loaded; a refusal is reported to every rank below, as a bad input
                self._reload_edited()
            except ValueError as e:
                error = e
        if self._awaiting_actions:
            self._refuse_without_lists(training, error)
        try:
            if error is None:
                prepared = self._check_inputs(args, kwargs, target, losses, training, return_outputs, loss_kwargs)
        except Exception as e:  # reported to every rank below, so that no peer waits for us
            error = e
        # Metadata is cached per mode (train / eval, grad on or off: what requires grad differs) and
        # exchanged again when the shapes sent in that mode change.
        mode = self._mode_key(training)
        # What requires grad decides what the stages send back: a stage frozen or unfrozen between
        # steps changes it, so every rank exchanges metadata afresh then, as for new shapes.
        grad_flags = tuple(p.requires_grad for st in self._stages.values() for p in st.submod.parameters())
        changed = mode not in self._signatures or grad_flags != self._grad_flags.get(mode) or (
            prepared is not None and prepared[3] is not None and prepared[3] != self._signatures[mode])
        agree = self._agree if training else None   # eval runs no collective over the replicas
        me, world = (dist.get_rank(), dist.get_world_size()) if agree else (self.rank, self.n_ranks)
        # a rank whose own error failed the step outranks those that only stopped waiting for it
        broken = 0 if not self._broken else me + 1 + (world if self._broken_own else 0)
        plan = 2 * self._plan_hash + int(training)
        rows = prepared[4] if prepared is not None else [0, 0]
        others: list = []   # the other pipelines' (rows, target rows): each must follow as this one's
        kinds = None
        if agree:   # shared fields, then each pipeline's own (changed, rows): one collective over every rank
            group, slot, slots = agree
            own = [0] * (3 * slots)
            own[3 * slot:3 * slot + 3] = [int(changed), *rows]
            # what the last stages' targets are: class ids on one replica and not on another would make the
            # replicas disagree on the token-count all-reduce (a collective one of them skips)
            ids = target is not None and (self.n_stages - 1) in self._stages and bool(class_id_tensors(target))
            other = target is not None and (self.n_stages - 1) in self._stages and not ids
            got = p2p.max_all_reduce([me + 1 if error else 0, broken, plan, -plan, int(ids), int(other), *own], group,
                                     _OPENING, AGREEMENT_NOTICE_S)
            kinds, got = (got[4], got[5]), got[:4] + got[6:]
            status = [got[0], got[4 + 3 * slot], got[1], got[2], got[3], *got[5 + 3 * slot:7 + 3 * slot]]
            others = [(got[5 + 3 * k], got[6 + 3 * k]) for k in range(slots) if k != slot]
        elif self.n_ranks > 1:
            status = p2p.max_all_reduce([me + 1 if error else 0, int(changed), broken, plan, -plan,
                                         *rows], self.group, _OPENING,
                                         AGREEMENT_NOTICE_S)
        else:
            status = [1 if error else 0, int(changed), broken, plan, -plan, *rows]
        if status[3] != -status[4]:   # the same on every rank: all of them raise here
            self._refuse_other_plans(training, agree[0] if agree else self.group)
        if status[2]:
            who = (status[2] - 1) % world
            why = f" ({self._broken})" if who == me and self._broken else ""
            raise RuntimeError(f"this pipeline cannot run another step: an earlier step failed mid-way on rank "
                               f"{who}{why}, and transfers "
                               f"that step started may still be pending, so a new step's messages could be "
                               f"taken by them (a hang or wrong data); restart the processes (pp.run resumes "
                               f"from the newest checkpoint)")
        if status[0] and (agree or self.n_ranks > 1):   # every rank: the refusing one tells the others why
            why = self._refusal_reason(status[0] - 1, me, error, agree[0] if agree else self.group)
        if error is not None:
            raise error
        check_rows_follow(int(status[5]), int(status[6]), self.n_microbatches,   # every rank alike
                          exact=self._batch_dim != 0)
        if status[0]:
            raise RuntimeError(f"pipeline step aborted: rank {status[0] - 1} refused the step ({why}); no rank "
                               f"started it" + (" (every data- and tensor-parallel replica stops with it)"
                                                if agree else ""))
        for rows_k, target_k in others:   # another replica's batch that its pipeline refuses: every replica stops
            try:
                check_rows_follow(int(rows_k), int(target_k), self.n_microbatches, exact=self._batch_dim != 0)
            except ValueError as e:
                raise RuntimeError(f"pipeline step aborted: another data- or tensor-parallel replica's batch was "
                                   f"refused ({e}); no rank started the step") from None
        if kinds is not None and all(kinds):
            raise ValueError("the replicas' targets disagree: on some the target holds class ids (integer "
                             "tensors), on others not (floats): every replica must pass the same kind of target, "
                             "or their token counts would not meet; no rank started the step")
        self._grad_flags[mode] = grad_flags
        for st in self._stages.values():   # torch's flag, for code that reads it
            st.has_backward = training
        self._abort.begin_step()
        mb_args, mb_kwargs, targets, signature, _, caller_graph = prepared
        if targets is not None and self._batch_dim == 0:   # k rows per sample (flattened per token) follow the batch
            followed = split_target_like(target, int(status[5]), int(status[6]), self.n_microbatches)
            targets = targets if followed is None else own_versions(followed)
        self._signatures[mode] = signature
        meta_mode = bool(status[1])
        is_last = (self.n_stages - 1) in self._stages
        if is_last and losses is not None:
            losses.clear()
        loss_fn = self._loss_fn if targets is not None else None
        if loss_fn is not None and loss_kwargs:
            loss_fn = functools.partial(loss_fn, **loss_kwargs)
        outputs: list | None = [] if is_last and return_outputs else None
        reduction = loss_reduction(loss_fn)
        scale = loss_scales(targets, self.n_microbatches, reduction, target_split_dim(target, self._batch_dim)) \
            if self.scale_grads else 1.0
        if isinstance(scale, list) and reduction is None and not self._warned_reduction:
            self._warned_reduction = True    # once per schedule (its loss_fn), not per step
            warn_unstated_reduction(loss_fn, scale)
        self._executor.mask_watch = None
        if is_last and training and self.scale_grads and reduction in (None, "mean") and loss_fn is not None:
            rows, scale = scale, token_shares(targets, loss_fn, scale, self._executor.device, self._count_group, target)
            if scale is not rows and self._mask_watch.steps:   # weighted by counted targets: watch the loss
                self._executor.mask_watch = self._mask_watch.use(loss_fn)
            if not self._warned_class_ids:   # once per schedule, as the reduction warning
                self._warned_class_ids = warn_ambiguous_class_ids(target, loss_fn)
        if training and self.scale_grads and self._labels_checks and 0 in self._stages \
                and self._loss_fn is not None and kwargs and "labels" in kwargs:
            checked = warn_labels_mean(mb_kwargs)   # a host sync: the first few steps with labels only
            self._labels_checks = 0 if checked else self._labels_checks - 1
        actions = self._train_actions if training else self._eval_actions
        after = self._after_hooks() if training else None
        for g in self._graphs.values():
            g.active = training
        wrapped = self._dp_wrapped
        if wrapped is not None:
            wrapped.begin(training)
        try:
            for s in self._stages.values():
                s.output_chunks = []   # the last step's outputs are not held through this one
            if training:   # shared parameters: this step's gradients are summed over their copies, once
                keep_one_accumulated(self._stages.values())
            # stages on different ranks draw apart (not under CUDA-graph replay: its captured random
            # ops keep the generator state they were captured with)
            with rank_streams(self.rank, 1 if self._graphs else self.n_ranks, self._executor.device):
                self._executor.run(actions, meta_mode=meta_mode, meta_key=mode, loss_fn=loss_fn,
                                   targets=targets, losses=losses, loss_scale=scale, outputs=outputs,
                                   record=self.record_trace, after=after, model_inputs=(mb_args, mb_kwargs),
                                   last_backward=self._last_backward if training else (),
                                   context=_PipelineContext(self, mb_args or [()] * self.n_microbatches,
                                                            mb_kwargs or [{}] * self.n_microbatches, targets,
                                                            losses) if self._executor.custom_functions else None)
        except BaseException as e:
            self._abort.post(e)  # the other ranks stop waiting for this one (pp.comms.abort)
            if self.n_ranks > 1:   # transfers of this step may still be pending: no further step
                self._broken = (str(e).strip().splitlines() or [type(e).__name__])[0][:200] or type(e).__name__
                transfers_may_be_pending()
                self._broken_own = not isinstance(e, PipelineAborted)
            for g in self._graphs.values():
                g.discard()
            if wrapped is not None:
                wrapped.end(ok=False)
            self._signatures.pop(mode, None)  # the next step in this mode exchanges metadata afresh
            raise
        finally:
            for s in self._stages.values():
                s.clear()
                if s.is_last:
                    s.output_chunks = outputs if outputs is not None else []
        if training:
            for g in self._graphs.values():
                g.flush()
            backward_into_caller(caller_graph)
        if wrapped is not None:   # DDP / FSDP2 averages complete before shared parameters are summed
            wrapped.end(ok=True)
        if training:
            try:
                sync_shared_grads(self._stages.values(), self.stage_to_rank, self.group, self._executor.device,
                                  check_values=not self._shared_checked)
            except BaseException as e:
                self._abort.post(e)   # copies of one rank alone can differ: the others must not wait
                raise
            self._shared_checked = True
            for g in self._graphs.values():
                g.capture_pending()
        if outputs is not None:
            return merge_chunks(outputs, self._output_merge_spec, spec_name="output_merge_spec",
                                default_dim=self._batch_dim,   # a batch split along dim 1 merges so
                                chunk_rows=split_sizes(int(status[5]), self.n_microbatches) if status[5] else None)
        return None

    def _after_hooks(self) -> dict | None:
        """{last backward action of a stage: what runs right after it}: add the stage's graph-summed
        weight gradients to `.grad`, start a DDP / FSDP2-wrapped stage's gradient sync, then call
        `on_backward_done`. Rebuilt only when the hook changes."""
        hook = self.on_backward_done
        if not self._graphs and hook is None and self._dp_wrapped is None:
            return None
        if self._after[0] is not hook or not self._after[1]:
            def done(stage: int) -> None:
                graphs = self._graphs.get(stage)
                if graphs is not None:
                    graphs.flush()
                if self._dp_wrapped is not None:
                    self._dp_wrapped.stage_done(stage)
                if hook is not None:
                    hook(stage)
            self._after = (hook, {a: functools.partial(done, s) for a, s in self._last_backward.items()})
        return self._after[1]
