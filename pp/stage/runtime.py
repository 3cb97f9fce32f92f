"""`PipelineStage`: one stage's module on one rank, its per-microbatch state, and its wiring.

The stage knows which stages feed each of its inputs and which read each of its outputs (not only
neighbours), runs forward and backward (whole, or split into input-grad and weight-grad) for one
microbatch at a time, and keeps what backward needs until backward has run. Where stages live and when
messages move is the executor's business; the stage only answers "what goes to stage c".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..comms.backend import is_initialized
from ..comms.p2p import group_rank, group_size
from .pipe import MODEL_INPUT, PipeInfo
from .backward import input_grads, run_backward, weight_grads
from .tensor_hooks import hooks_seen
from .compiled import inner_module
from .graphs import StageGraphs
from .modes import call_with_forward, mode_forward, retarget_devices
from .aliases import inplace_safe
from .chunks import ChunkMethods
from .input_checks import StageInputChecks
from .outputs import differentiable, flat_outputs, positional

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


_REPLAYED = "replayed"   # pending_weight of a microbatch whose W is a CUDA-graph replay


@dataclass
class _Microbatch:
    """What one microbatch leaves on a stage between its forward and its backward."""

    inputs: list = field(default_factory=list)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: tuple = ()
    final: Any = None               # the model-shaped output (last stage)
    loss: torch.Tensor | None = None
    scale: Any = 1.0                # the last stage's loss seed (the microbatch's share of the step's loss)
    out_grads: dict = field(default_factory=dict)   # output index -> summed gradient
    in_grads: list | None = None
    pending_weight: Any = None      # state kept from I for W
    hooked: set | None = None       # backward nodes the forward gave tensor hooks (a manual stage's)

    def hook_seen(self, tensor: torch.Tensor) -> None:
        """The forward registered a tensor hook on `tensor`: its node goes into `hooked` (made on demand)."""
        if tensor.grad_fn is not None:
            if self.hooked is None:
                self.hooked = set()
            self.hooked.add(tensor.grad_fn)


def _meta_of(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape), value.dtype, differentiable(value))
    return ("v", value)


class PipelineStage(ChunkMethods, StageInputChecks):
    """One pipeline stage on this rank.

    Manual form (the user cut the model): `PipelineStage(submodule, stage_index, num_stages, device)`;
    stage i then takes the outputs of stage i-1 as positional inputs, and shapes are learnt at the first
    step. Traced form: `Pipe.build_stage(i, device)` / `pp.build_stage(...)`, wired by the splitter.

    The parameters are torch.distributed.pipelining's, in its order; its older positional order
    (`..., output_args, group, dw_builder`) is read too. `input_args` (one microbatch of inputs, for
    stages after the first) sets the shapes and dtypes received tensors are checked against;
    `output_args`, `output_grads`, `input_grads` and `get_mesh` are taken for code moving over and not
    needed: shapes and gradient layouts come from the first step. Raises TypeError for values of the
    wrong kind.

    The module may be wrapped by torch DDP or sharded by FSDP2 (`fully_shard`) over a data-parallel
    group: its gradients are then averaged over that group once per step, after the stage's last
    backward, for every schedule (pp/parallel/wrapped.py).

    `dw_builder` (as in torch.distributed.pipelining): a callable taking no arguments that returns a
    callable taking none, the user's weight-gradient runner. When given, every backward of this stage
    is one full autograd backward (weight gradients included), and a runner is built and called once
    per microbatch: right after B in schedules without a separate W; built after I and called at W in
    zero-bubble schedules (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV).

    Parameters that several stages share (tied embeddings) train as one only in the traced form, where
    the splitter finds them by identity under any of their names and `step()` sums their gradients over
    the ranks holding them. Manual stages on one rank that hold the same nn.Parameter object share
    its `.grad`, as any two modules do; manual stages in different processes hold separate copies that
    pp cannot tell apart from unrelated tensors, so each copy trains on its own gradient: sum those
    gradients yourself after `step()` (an all-reduce over the ranks holding the parameter) or use
    `pp.pipeline`.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int,
                 device: torch.device | str | int, input_args: Any = None, output_args: Any = None,
                 output_grads: Any = None, input_grads: Any = None, group: ProcessGroup | None = None,
                 dw_builder: Callable[[], Callable[..., Any]] | None = None, get_mesh: Callable | None = None,
                 *, pipe_info: PipeInfo | None = None):
        # torch < 2.12 took (..., output_args, group, dw_builder) positionally: a process group (or a
        # builder) in the gradient-example slots is that order, read as torch read it.
        if isinstance(output_grads, torch.distributed.ProcessGroup) or (
                output_grads is None and callable(input_grads) and not isinstance(input_grads, torch.Tensor)):
            if group is not None or dw_builder is not None:
                raise TypeError("PipelineStage got group/dw_builder both by position (torch's older order) and "
                                "by keyword")
            group, dw_builder, output_grads, input_grads = output_grads, input_grads, None, None
        for name, value in (("output_args", output_args), ("output_grads", output_grads),
                            ("input_grads", input_grads)):
            if value is not None and not isinstance(value, torch.Tensor) and not (
                    isinstance(value, (tuple, list)) and all(v is None or isinstance(v, torch.Tensor) for v in value)):
                raise TypeError(f"{name} must be a tensor or a tuple of tensors (an example for one microbatch "
                                f"of stage {stage_index}), got {type(value).__name__}")
        if get_mesh is not None and not callable(get_mesh):
            raise TypeError(f"get_mesh must be a callable returning a DeviceMesh, got {type(get_mesh).__name__}")
        if not isinstance(submodule, nn.Module):
            raise TypeError(f"PipelineStage needs an nn.Module, got {type(submodule).__name__}")
        if dw_builder is not None and not callable(dw_builder):
            raise TypeError(f"dw_builder must be a callable that returns the weight-gradient runner, "
                            f"got {type(dw_builder).__name__}")
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
        if not isinstance(stage_index, int) or not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index {stage_index!r} is out of range for {num_stages} stages")
        if pipe_info is not None:
            _refuse_stale_buffers(pipe_info)
        if not is_initialized():
            raise RuntimeError("PipelineStage needs torch.distributed initialised first "
                               "(e.g. pp.comms.backend.init_process_group_from_env())")
        self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group = group
        self.dw_builder = dw_builder
        self.group_rank = group_rank(group)
        self.group_size = group_size(group)
        self.pipe_info = pipe_info
        self.input_args, self.output_args = input_args, output_args
        # torch's static metadata, kept for code moving over: pp learns shapes and gradient layouts from
        # the first microbatch of a step and checks received tensors against them itself.
        self.output_grads, self.input_grads, self.get_mesh = output_grads, input_grads, get_mesh
        if input_args is not None and not isinstance(input_args, torch.Tensor) and not (
                isinstance(input_args, (tuple, list)) and all(isinstance(a, torch.Tensor) for a in input_args)):
            raise TypeError(f"input_args must be a tensor or a tuple of tensors (one microbatch of stage "
                            f"{stage_index}'s inputs), got {type(input_args).__name__}")
        self.submod = _move(submodule, self.device)
        # DDP / FSDP2 around the stage module: its gradient sync runs once per step (pp/parallel/wrapped.py).
        from ..parallel.wrapped import stage_wrapper
        self.dp_wrapper = stage_wrapper(self.submod)
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.has_backward = False   # torch's flag: whether the last step ran backwards (set by the schedule)
        self.stage_to_rank: list[int] | None = None
        if pipe_info is not None:
            io = pipe_info.stage_io[stage_index]
            self._recv_slots: dict[int, list[int] | None] = {}
            for slot, (src, idx) in sorted(enumerate(io.input_sources), key=lambda x: x[1]):
                if src != MODEL_INPUT:
                    self._recv_slots.setdefault(src, []).append(slot)
            self._send_outputs: dict[int, list[int] | None] = {}
            for out_idx, consumers in enumerate(io.output_consumers):
                for c, _ in consumers:
                    self._send_outputs.setdefault(c, []).append(out_idx)
            self.n_inputs = len(io.input_sources)
        else:
            self._recv_slots = {} if self.is_first else {stage_index - 1: None}
            self._send_outputs = {} if self.is_last else {stage_index + 1: None}
            self.n_inputs = None
        self._mb: dict[int, _Microbatch] = {}
        # The last stage's outputs of the last step, one per microbatch, when the step returned them
        # (torch's name; kept until the next step or clear_runtime_states)
        self.output_chunks: list = []
        self._mode_graphs: dict[bool, Any] = {}   # module mode -> its ModeGraph, None: the traced graph
        self._mode_graph: Any = None             # the one in use (sync_mode)
        self._expected: list | None = None  # see check_received
        self._accepted: set = set()         # input shapes check_model_inputs let through
        self.graphs: StageGraphs | None = None      # set by the schedule's enable_cuda_graphs()
        self.compiled: Any = None   # the stage's CompileCounter, set by the schedule's compile()
        # Set by pp.parallel.precision: floating activations sent to other stages (and accepted from
        # them) in this dtype, and the forward run under torch.autocast to it (bf16-mixed).
        self.activation_dtype: torch.dtype | None = None
        self.autocast = False
        # False: floating activations are sent in the dtype they were computed in (under bf16-mixed the
        # float32 residual stream crosses in float32, as in the unsplit autocast model: exact, more traffic)
        self.cast_activations = True
        # bf16-mixed: the bfloat16 weight copies the stage computes with (pp.parallel.precision.Bf16Weights),
        # refreshed from the float32 masters at the first forward of each step
        self.bf16_weights: Any = None
        # None: pp.stage.backward.NODE_HOOKS; False where nothing hooks the parameters' AccumulateGrad
        # nodes (pp.parallelize without DDP/FSDP wrapping): W then writes .grad itself, one add fewer
        self.node_hooks: bool | None = None

    # -------------------------------------------------------------------------------- wiring
    @property
    def producers(self) -> list[int]:
        return sorted(self._recv_slots)

    @property
    def consumers(self) -> list[int]:
        return sorted(self._send_outputs)

    def output_indices_for(self, consumer: int, m: int) -> list[int]:
        idx = self._send_outputs[consumer]
        return list(range(len(self._mb[m].outputs))) if idx is None else idx

    def input_slots_from(self, producer: int, count: int) -> list[int]:
        slots = self._recv_slots[producer]
        return list(range(count)) if slots is None else slots

    def output_example(self) -> Any:
        """The last stage's output as the model returns it, with the traced graph's fake tensors (shapes,
        dtypes) for values; None where unknown (a stage cut by hand, or a graph that holds no shapes)."""
        gm = inner_module(self.submod)
        if self.pipe_info is None or not isinstance(gm, fx.GraphModule):
            return None
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        vals = [getattr(a, "meta", {}).get("val") if isinstance(a, fx.Node) else a
                for a in (out if isinstance(out, (tuple, list)) else [out])]
        if any(v is None for v in vals) or len(vals) != self.pipe_info.out_spec.num_leaves:
            return None
        return pytree.tree_unflatten(vals, self.pipe_info.out_spec)

    @property
    def runs_other_mode(self) -> bool:
        """Whether the stage runs the graph of the mode it was not traced in (its module switched to eval
        or train since, and the two traces differ: pp.stage.modes), as of the last `sync_mode`."""
        return self._mode_graph is not None

    # ------------------------------------------------------------------------------- per step
    @property
    def fwd_cache(self) -> dict[int, tuple]:
        """{microbatch: (outputs, inputs)} of the forwards whose backward has not run yet (torch's name);
        empty between steps."""
        return {m: (st.outputs, st.inputs) for m, st in self._mb.items() if st.outputs}

    def clear_runtime_states(self) -> None:
        """Drop what the last step left on this stage, `output_chunks` included (torch's name)."""
        self.clear()
        self.output_chunks = []

    def scale_grads(self, grad_scale_factor: int) -> None:
        """Divide this stage's parameter gradients by `grad_scale_factor` (torch's method, for schedules
        built with `scale_grads=False` whose caller scales by the microbatch count itself). ValueError for a
        factor that is not a positive number."""
        if isinstance(grad_scale_factor, bool) or not isinstance(grad_scale_factor, (int, float)) \
                or not grad_scale_factor > 0:
            raise ValueError(f"scale_grads takes a positive number to divide the gradients by (the microbatch "
                             f"count), got {grad_scale_factor!r}")
        if grad_scale_factor != 1:
            for p in self.submod.parameters():
                if p.grad is not None:
                    p.grad.div_(grad_scale_factor)

    def clear(self) -> None:
        self._mb.clear()
        if self.bf16_weights is not None:
            self.bf16_weights.stale = True   # the optimizer may change the masters before the next step
        if self.graphs is not None:
            self.graphs.reset()

    def state(self, m: int) -> _Microbatch:
        st = self._mb.get(m)
        if st is None:
            st = self._mb[m] = _Microbatch()
        return st

    def set_model_inputs(self, m: int, args: tuple, kwargs: dict) -> None:
        """Stage 0's inputs for microbatch m, straight from the user's batch."""
        st = self.state(m)
        if self.pipe_info is not None:
            st.inputs = list(self.pipe_info.input_binder.flatten(args, kwargs))
            st.inputs = [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in st.inputs]
        else:
            st.args = tuple(_to(a, self.device) for a in args)
            st.kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}

    def set_input(self, m: int, slot: int, value: Any) -> None:
        st = self.state(m)
        if len(st.inputs) <= slot:
            st.inputs.extend([None] * (slot + 1 - len(st.inputs)))
        st.inputs[slot] = value

    def forward_one(self, m: int) -> Any:
        """Forward of microbatch m on the inputs set for it; returns what the module returned (cast to the
        activation dtype where activations cross stages in one), and keeps the flat outputs to send."""
        st = self.state(m)
        if self.bf16_weights is not None and self.bf16_weights.stale:
            self.bf16_weights.refresh()
        if not self.autocast:
            out = self._forward(m, st)
        else:
            with torch.autocast(self.device.type, dtype=self.activation_dtype):
                out = self._forward(m, st)
        if self.activation_dtype is not None and not self.is_last and self.cast_activations:
            out = _cast_floats(out, self.activation_dtype)
        if self.is_last:
            if self.pipe_info is not None:
                st.final = pytree.tree_unflatten(list(out), self.pipe_info.out_spec)
            else:
                st.final = out
        if self.pipe_info is None and not self.is_last:
            st.outputs = flat_outputs(out)
        else:
            st.outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return out

    def _forward(self, m: int, st: _Microbatch) -> Any:
        out = self._replay(m, st) if self.graphs is not None else None
        if out is not None:
            return out
        if self._mode_graph is not None:
            return call_with_forward(self.submod, inner_module(self.submod), self._mode_graph.forward, st.inputs)
        if self.pipe_info is not None:
            return self.submod(*st.inputs)
        with hooks_seen(st.hook_seen):   # a manual stage's own code may hook its activations (W must know)
            if self.is_first:
                return self.submod(*inplace_safe(st.args), **inplace_safe(st.kwargs))
            # what it received, and its rank's step keywords it takes (torch)
            return self.submod(*inplace_safe(positional(st.inputs)), **st.kwargs)

    def sync_mode(self) -> None:
        """Pick the graph for the stage module's current train/eval mode, before a step: a traced graph
        holds the mode it was traced in (pp.stage.modes). ValueError where the mode cannot be switched."""
        if self.pipe_info is None:
            return
        training = self.submod.training
        if training not in self._mode_graphs:
            self._mode_graphs[training] = mode_forward(self.pipe_info, self.stage_index, inner_module(self.submod),
                                                       self.device)
        graph = self._mode_graphs[training]
        if graph is not self._mode_graph:   # the inputs are checked against the graph in use
            self._mode_graph, self._expected = graph, None
            self._accepted.clear()


    def _replay(self, m: int, st: _Microbatch) -> Any:
        """The stage's outputs from a CUDA-graph replay, or None where it runs eagerly (eval, no grad,
        keyword inputs, shapes not captured yet)."""
        if not (self.submod.training and torch.is_grad_enabled()):
            return None
        if st.kwargs:
            return None
        if self.is_first and self.pipe_info is None:
            return self.graphs.forward(m, list(st.args))
        return self.graphs.forward(m, st.inputs)

    def add_output_grad(self, m: int, out_idx: int, grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        grads = self.state(m).out_grads
        grads[out_idx] = grad if out_idx not in grads else grads[out_idx] + grad

    def _roots(self, st: _Microbatch, loss_scale: float | torch.Tensor) -> tuple[list, list]:
        if self.is_last and st.loss is not None:
            if st.loss.numel() != 1:
                raise ValueError(f"loss_fn must return a single-element loss, got shape {tuple(st.loss.shape)}")
            seed = (loss_scale.to(st.loss.dtype).reshape(st.loss.shape) if isinstance(loss_scale, torch.Tensor)
                    else torch.full_like(st.loss, loss_scale))   # the seed scales: no extra multiply
            return [st.loss], [seed]
        roots, grads, at = [], [], {}
        for i, out in enumerate(st.outputs):
            g = st.out_grads.get(i)
            if isinstance(out, torch.Tensor) and out.requires_grad and g is not None:
                j = at.get(id(out))
                if j is not None:   # one tensor sent twice ((h, h)): one root with the summed gradient
                    grads[j] = grads[j] + g      # (the I/W split counts a repeated root's node once)
                    continue
                at[id(out)] = len(roots)
                roots.append(out)
                grads.append(g)
        return roots, grads

    def _output_grads(self, st: _Microbatch, loss_scale: float) -> list:
        """The gradient of each output (None where none came), for a replayed backward; on the last stage
        taken through the loss by autograd, down to the replayed outputs."""
        outs = st.outputs
        if not (self.is_last and st.loss is not None):
            return [st.out_grads.get(i) for i in range(len(outs))]
        (loss,), (seed,) = self._roots(st, loss_scale)
        idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
        got = torch.autograd.grad([loss], [outs[i] for i in idx], [seed], allow_unused=True)
        grads: list = [None] * len(outs)
        for i, g in zip(idx, got):
            grads[i] = g
        return grads

    def _grad_inputs(self, st: _Microbatch) -> list[torch.Tensor]:
        return [x for x in st.inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def backward_one(self, m: int, loss_scale: float = 1.0) -> None:
        """Full backward (B) of microbatch m: input grads for the producers, weight grads accumulated;
        then the user's weight-gradient runner, where the stage has a `dw_builder`."""
        self._full_backward(m, loss_scale)
        if self.dw_builder is not None:
            self._build_runner()()

    def _build_runner(self) -> Callable[..., Any]:
        runner = self.dw_builder()
        if not callable(runner):
            raise TypeError(f"stage {self.stage_index}: dw_builder() must return a callable (the weight-"
                            f"gradient runner), got {type(runner).__name__}")
        return runner

    def _full_backward(self, m: int, loss_scale: float) -> None:
        if self.graphs is not None and self.graphs.split and self.graphs.holds(m):
            self._split_backward_input(m, loss_scale)     # replayed as two graphs: run both halves now
            self._split_backward_weight(m)
            return
        st = self._mb[m]
        roots, grads = self._roots(st, loss_scale)
        if roots:
            run_backward(roots, grads, accumulate=True, keep_graph=False)
        if self.graphs is not None:
            self.graphs.release(m)
        self._keep_input_grads(st, [x.grad if isinstance(x, torch.Tensor) and x.requires_grad and not self.is_first
                                    else None for x in st.inputs])   # the first stage's: the caller's views
        self._maybe_drop(m)

    def backward_input(self, m: int, loss_scale: float = 1.0) -> None:
        """Input-grad half (I): gradients for the producers now, weight grads deferred to W
        (`pp.stage.backward`). With a `dw_builder`, as in torch: the full backward now, and the runner
        the builder returns kept for W."""
        if self.dw_builder is None:
            self._split_backward_input(m, loss_scale)
            return
        self._full_backward(m, loss_scale)
        runner = self._build_runner()
        st = self.state(m)      # anew if the backward left nothing to hand over
        if st.in_grads is None:
            st.in_grads = []
        st.pending_weight = runner

    def _split_backward_input(self, m: int, loss_scale: float) -> None:
        st = self._mb[m]
        if self.graphs is not None and self.graphs.holds(m):
            got = self.graphs.backward_input(m, self._output_grads(st, loss_scale))
            self._keep_input_grads(st, got)
            st.pending_weight = _REPLAYED
            return
        roots, grads = self._roots(st, loss_scale)
        inputs = [] if self.is_first else self._grad_inputs(st)
        got, st.pending_weight = input_grads(roots, grads, inputs, node_hooks=self.node_hooks, hooked=st.hooked)
        it = iter(got)
        self._keep_input_grads(st, [next(it) if isinstance(x, torch.Tensor) and x.requires_grad and not self.is_first
                                    else None for x in st.inputs])

    def backward_weight(self, m: int) -> None:
        """Weight-grad half (W) of microbatch m, after its I (with a `dw_builder`: the user's runner)."""
        if self.dw_builder is None:
            self._split_backward_weight(m)
            return
        st = self._mb[m]
        runner, st.pending_weight = st.pending_weight, None
        self._maybe_drop(m)
        runner()

    def _split_backward_weight(self, m: int) -> None:
        st = self._mb.get(m)
        if st is None:   # I ran the whole backward (pp.stage.backward) and the gradients were handed over
            return
        pending, st.pending_weight = st.pending_weight, None
        if pending is _REPLAYED:
            self.graphs.backward_weight(m)
        else:
            weight_grads(pending)
        self._maybe_drop(m)

    def _keep_input_grads(self, st: _Microbatch, grads: list) -> None:
        # An input the graph did not use keeps None: its producer gets no gradient for that output (the
        # executor tells a remote producer so), as in the unsplit model.
        st.in_grads = [None] * len(st.inputs) if self.is_first else list(grads)
        st.inputs, st.args, st.kwargs = [], (), {}
        st.outputs, st.out_grads, st.loss, st.final = (), {}, None, None

    def input_grad(self, m: int, slot: int) -> torch.Tensor | None:
        """The gradient of input `slot` for microbatch m, handed over once (then the stage forgets it)."""
        st = self._mb.get(m)
        if st is None or st.in_grads is None:
            return None
        g = st.in_grads[slot]
        st.in_grads[slot] = None
        self._maybe_drop(m)
        return g

    def _maybe_drop(self, m: int) -> None:
        st = self._mb.get(m)
        if st is not None and st.pending_weight is None and st.in_grads is not None and \
                all(g is None for g in st.in_grads):
            del self._mb[m]

    def __repr__(self) -> str:
        kind = "traced" if self.pipe_info is not None else "manual"
        return f"PipelineStage({kind}, stage {self.stage_index} of {self.num_stages}, {self.device})"


def _refuse_stale_buffers(info: PipeInfo) -> None:
    """A buffer updated in forward and read by another stage than the one updating it cannot be
    pipelined: each stage's copy is its own (on its own rank), so readers would use a stale value and,
    with microbatches in flight, the update order differs from the model's anyway."""
    for fqn, (readers, updater) in sorted(info.stale_buffers.items()):
        raise ValueError(
            f"buffer {fqn!r} is updated in forward on stage {updater} and read on stages {readers}: a stage's "
            f"copy is its own, so stages other than {updater} would read a stale value (wrong results, no "
            f"error); cut the model so that every read and the update of {fqn!r} fall in one stage "
            f"(split_spec or pipe_split), or update it outside forward")


def build_stage(stage_module: nn.Module, stage_index: int, pipe_info: PipeInfo,
                device: torch.device | str | int, group: ProcessGroup | None = None) -> PipelineStage:
    """The runtime stage for a module cut by `pp.pipeline` (torch-compatible signature)."""
    if not isinstance(pipe_info, PipeInfo):
        raise TypeError(f"build_stage needs the PipeInfo from Pipe.info(), got {type(pipe_info).__name__}")
    if not isinstance(stage_index, int) or not 0 <= stage_index < pipe_info.num_stages:
        raise ValueError(f"stage_index {stage_index!r} is out of range: the pipe has stages "
                         f"0..{pipe_info.num_stages - 1}")
    return PipelineStage(stage_module, stage_index, pipe_info.num_stages, device, group=group,
                         pipe_info=pipe_info)


def _cast_floats(out: Any, dtype: torch.dtype) -> Any:
    """`out` (a tensor or a tuple/list of values) with its floating tensors in `dtype`."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                         for x in out)
    return out


def _to(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


def _move(module: nn.Module, device: torch.device) -> nn.Module:
    """Move a stage module to `device`; traced graphs also get their baked-in device arguments rewritten."""
    module = module.to(device)
    if isinstance(module, fx.GraphModule):
        retarget_devices(module, device)
    return module
