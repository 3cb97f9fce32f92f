"""`pp.parallelize`: a model in, this rank's part of a pipeline × data × tensor-parallel run out.

Every rank traces and cuts the model alike, keeps the stages its pipeline rank holds, rewrites them for
tensor parallelism within its tp group, and runs them with a schedule over its pp group; gradients
are averaged over its dp group during the step. See the README, "Pipeline × data × tensor parallelism".
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from pp.parallel.checkpointing import apply_checkpointing, check_mode
from pp.parallel.data_parallel import GradSync
from pp.parallel.mesh import check_mesh, make_mesh, mesh_coords
from pp.parallel.meta import check_keys, fill, is_meta, materialize, real_tensors, to_meta
from pp.parallel.precision import apply_precision, cast_module, check_precision
from pp.parallel.zero import ShardedParams, check_zero
from pp.stage.marker import SplitPoint
from pp.stage.modes import meta_copy
from pp.stage.pipe import Pipe
from pp.stage.policies import SplitPolicy, split_by_cost
from pp.stage.split import UnlessMarked, pipeline
from pp.parallel.model import ParallelModel

__all__ = ["ParallelModel", "parallelize"]


def parallelize(
    module: nn.Module | Pipe,
    mb_args: tuple = (),
    mb_kwargs: dict | None = None,
    *,
    n_microbatches: int,
    loss_fn: Callable,
    pp: int | None = None,
    dp: int = 1,
    tp: int = 1,
    schedule: str = "1F1B",
    stages_per_rank: int | None = None,
    tp_plan: Mapping[str, Any] | None = None,
    split_spec: Mapping[str, SplitPoint] | None = None,
    split_policy: SplitPolicy | None = None,
    device: torch.device | str | None = None,
    mesh: DeviceMesh | None = None,
    cuda_graphs: bool = False,
    compile: bool = False,
    compile_per: str | None = None,
    precision: str = "fp32",
    activation_checkpointing: str = "none",
    zero: int = 0,
    init_fn: Callable[[str, torch.Tensor], None] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    scale_grads: bool = True,
    args_chunk_spec: tuple | None = None,
    kwargs_chunk_spec: dict | None = None,
    output_merge_spec: Any = None,
) -> ParallelModel:
    """Build this rank's part of `module` trained with pp × dp × tp parallelism; collective.

    `mb_args`/`mb_kwargs` are one microbatch of this replica (local batch / n_microbatches), used to
    trace; `module` may also be a `Pipe` already cut. The cut follows `split_spec`, `split_policy`,
    the model's `pipe_split()` calls, or else `split_by_cost`. `tp_plan` maps module names to
    `pp.tp.ColwiseParallel`/`RowwiseParallel`. `pp` defaults to world / (dp * tp); `mesh`, if given,
    is a (pp, dp, tp) DeviceMesh (`pp.parallel.make_mesh`) whose sizes win. `device` defaults to
    cuda:LOCAL_RANK when CUDA is available, else cpu, and to cpu under a process group with gloo alone
    (`pp.comms.backend.default_device`). `cuda_graphs=True` replays the stages as CUDA
    graphs from the second step on (`schedule.enable_cuda_graphs()`; not with tp > 1). `compile=True` runs
    each stage's forward and backward through torch.compile, per block or per stage (`compile_per`
    "block" or "stage"; None: per stage, per block with activation checkpointing, the faster measured;
    `schedule.compile()`); compiles happen at the first step, once per input shape. `scale_grads=False`
    seeds each microbatch's loss gradient with 1 instead of its share of the batch (for a loss that does
    its own scaling; by default the share is of the counted targets for class-id targets with ignored
    ones, over every replica, else of the rows: docs/splitter.md). `args_chunk_spec`, `kwargs_chunk_spec`
    and `output_merge_spec` say how `step`/`eval` split the inputs into microbatches and merge the last
    stage's outputs, as for torch's schedules (`pp.microbatch.TensorChunkSpec(dim)`, or `_Replicate`
    for an input every microbatch takes whole, such as a mask of batch 1).

    `precision`: "fp32", "bf16-mixed" (float32 parameters, gradients and optimizer state; each stage computes
    with bfloat16 copies of its matrices, refreshed once per step, under bfloat16 autocast; activations cross
    stages in bfloat16; pp.parallel.precision) or "bf16" (everything bfloat16; `module`'s own parameters
    are cast in place, as `module.to(torch.bfloat16)` would).
    `activation_checkpointing`: "none", "selective" (recompute element-wise ops, keep matmul and attention
    outputs) or "full" (recompute each block in backward). `zero`: 0 (replicated), 1 (optimizer state
    sharded over dp), 2 (also gradients), 3 (also parameters between steps); build the optimizer with
    `ParallelModel.build_optimizer`. A `module` on the meta device is traced there and each rank fills
    only its own stages' tensors: from `state_dict` (whole tensors under the model's names) or with
    `init_fn(name, tensor)` (e.g. seeded by `pp.parallel.meta.generator_for(seed, name)`), the state dict
    first where both are given; tensors that were real (buffers of a model whose parameters alone were on
    meta) keep their values unless the state dict holds them (`pp.parallel.meta.fill`).
    ValueError for an unknown precision, checkpointing mode or ZeRO level, and for a `loss_fn` module
    with trainable parameters at dp > 1 (not the model's: nothing would average them over replicas; at
    dp 1 they train like the model's under every schedule, in the caller's optimizer and clipping). Tensor hooks and
    post-accumulate-grad hooks on the parameters run once per microbatch; hooks put on their
    AccumulateGrad nodes run only with `stage.node_hooks = True` on the stages (`ParallelModel.stages`).
    """
    from pp.comms.backend import default_device, get_world_size
    from pp.schedules.classes import PipelineScheduleSingle, schedule_class
    from pp.schedules.registry import get_spec
    from pp.stage.runtime import build_stage
    from pp.tp.stage import shard_stage_module

    if not isinstance(module, (nn.Module, Pipe)):
        raise TypeError(f"module must be an nn.Module or a pp.Pipe, got {type(module).__name__}")
    if not isinstance(n_microbatches, int) or isinstance(n_microbatches, bool) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be a positive integer, got {n_microbatches!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, target) -> loss, got {type(loss_fn).__name__}")
    for name, value in (("pp", pp), ("dp", dp), ("tp", tp)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if tp_plan is not None and not isinstance(tp_plan, Mapping):
        raise TypeError(f"tp_plan must map module names to pp.tp styles, got {type(tp_plan).__name__}")
    if mesh is not None:
        check_mesh(mesh)
        given = {"pp": pp, "dp": dp, "tp": tp}
        sizes = dict(zip(("pp", "dp", "tp"), mesh.shape))
        bad = [k for k, v in given.items() if v is not None and v != sizes[k] and (k == "pp" or v != 1)]
        if bad:
            raise ValueError(f"{bad[0]}={given[bad[0]]} disagrees with the mesh, whose shape is {sizes}")
        pp, dp, tp = sizes["pp"], sizes["dp"], sizes["tp"]
    elif pp is None:
        world = get_world_size()
        if world % (dp * tp):
            raise ValueError(f"dp={dp} x tp={tp} does not divide the world size {world}")
        pp = world // (dp * tp)
    if cuda_graphs and tp > 1:
        raise ValueError(f"cuda_graphs=True with tp={tp}: stages with tensor-parallel collectives are not "
                         f"captured; use tp=1 or cuda_graphs=False")
    if tp > 1 and not tp_plan:
        raise ValueError(f"tp={tp} needs a tp_plan: {{module name: pp.tp.ColwiseParallel() or RowwiseParallel()}}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile_per is not None and compile_per not in ("block", "stage"):
        raise ValueError(f"compile_per={compile_per!r} is not a compile granularity; expected 'block' or 'stage'")
    precision = check_precision(precision)
    ac = check_mode(activation_checkpointing)
    if compile and compile_per == "stage" and ac != "none":
        raise ValueError(f"compile_per='stage' with activation_checkpointing={ac!r}: the recompute is not "
                         f"traced into a compiled stage; use compile_per='block'")
    zero = check_zero(zero, dp)
    loss_params = [n for n, p in loss_fn.named_parameters() if p.requires_grad] \
        if isinstance(loss_fn, nn.Module) else []
    if loss_params and dp > 1:
        raise ValueError(
            f"loss_fn ({type(loss_fn).__name__}) has trainable parameters ({', '.join(loss_params[:3])}"
            f"{', ...' if len(loss_params) > 3 else ''}) and dp={dp}: they are not the model's, so their "
            f"gradients would not be averaged over the replicas (nor sharded, clipped or checkpointed); "
            f"make them part of the model (its last layer) or freeze them")
    if cuda_graphs and zero == 3:
        raise ValueError("cuda_graphs=True with zero=3: ZeRO 3 frees the whole parameters between steps, and "
                         "a replayed graph reads them where it was captured; use zero=1 or 2, or cuda_graphs=False")
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be callable (name, tensor) -> None, got {type(init_fn).__name__}")
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must map parameter names to tensors, got {type(state_dict).__name__}")
    if state_dict is not None and isinstance(module, nn.Module) and not isinstance(module, Pipe):
        # before any work, on every rank alike: entries that fill nothing, of another shape, or missing
        meta_model = is_meta(module)
        check_keys(module, state_dict, complete=init_fn is None or not meta_model,
                   kept=real_tensors(module) if meta_model else None)
    on_meta = is_meta(module)
    if on_meta and init_fn is None and state_dict is None:
        raise ValueError("the model is on the meta device: pass init_fn=(name, tensor) -> None or a state_dict "
                         "to fill each rank's stages")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this torch sees no CUDA device "
                         f"(torch {torch.__version__}); pass device='cpu' or leave device out")
    spec = get_spec(schedule)
    n_stages = spec.n_stages(pp, stages_per_rank)
    if mesh is None:
        mesh = make_mesh(pp, dp, tp)
    coords = mesh_coords(mesh)

    if isinstance(module, Pipe) and (split_spec is not None or split_policy is not None):
        raise ValueError("module is a Pipe, already cut: drop split_spec/split_policy")
    user = module if isinstance(module, nn.Module) and not isinstance(module, Pipe) else None
    kept: dict = {}
    if on_meta and not isinstance(module, Pipe):
        mb_args, mb_kwargs = to_meta(tuple(mb_args)), to_meta(mb_kwargs)
        kept = real_tensors(module)
        if kept:   # parameters alone on meta: traced as a copy wholly on meta, the values kept to fill it
            module = meta_copy(module) or module
    if precision == "bf16" and not isinstance(module, Pipe):   # traced in bf16: dtype casts in the graph are bf16
        cast_module(module, precision)
    pipe = module if isinstance(module, Pipe) else _split_for_training(module, mb_args, mb_kwargs, n_stages,
                                                                       split_spec, split_policy)
    if pipe.num_stages != n_stages:
        raise ValueError(f"the model is cut into {pipe.num_stages} stages, but schedule {spec.name} with "
                         f"pp={pp} needs {n_stages}")
    info = pipe.info()
    if tp > 1:
        _check_plan(pipe, tp_plan)
    placement = spec.placement(n_stages, pp)
    stages, shards, regions = [], {}, 0
    made: dict = {}     # meta tensor id -> its storage, shared by this rank's stages (tied weights stay one)
    filled: set = set()
    for s in (s for s, r in enumerate(placement) if r == coords["pp"]):
        mod = pipe.get_stage_module(s)
        if is_meta(mod):  # only this rank's stages get storage, filled whole before any tp cut
            materialize(mod, device, made)
            fill(mod, init_fn, state_dict, seen=filled, fresh={id(t) for t in made.values()}, kept=kept)
        elif state_dict is not None:
            fill(mod, None, state_dict, fresh=set())
        if precision == "bf16":
            cast_module(mod, precision)
        if tp > 1 and _plan_covers(mod, tp_plan):
            mod = shard_stage_module(mod, None, coords["tp"], tp, device.type, tp_plan, group=mesh.get_group("tp"))
            shards.update(mod.tp_shards)
        stage = build_stage(mod, s, info, device, group=mesh.get_group("pp"))
        apply_precision(stage, precision)
        regions += len(apply_checkpointing(stage.submod, ac, once=spec.split_backward))
        stage.node_hooks = False  # nothing of pp's hooks AccumulateGrad nodes: W adds into .grad itself

        stages.append(stage)
    if ac != "none" and regions == 0:
        warnings.warn(f"activation_checkpointing={ac!r}: the stages of pipeline rank {coords['pp']} hold no "
                      f"block to recompute (no module list of layers), so they keep their activations", stacklevel=2)
    cls = schedule_class(spec.name)
    target = stages[0] if issubclass(cls, PipelineScheduleSingle) else stages
    sched = cls(target, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads, args_chunk_spec=args_chunk_spec,
                kwargs_chunk_spec=kwargs_chunk_spec, output_merge_spec=output_merge_spec)
    if compile:
        sched.compile(per=compile_per)
    if cuda_graphs:
        sched.enable_cuda_graphs()
    sync, zshards = None, None
    if dp > 1 and zero < 2:
        sync = GradSync({s.stage_index: list(s.submod.named_parameters()) for s in stages},
                        mesh.get_group("dp"), deferred=info.shared_params)
        sched.on_backward_done = sync.stage_done
    elif dp > 1:
        named, seen = [], set()
        for st in stages:
            for name, p in st.submod.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    named.append((name, p))
        zshards = ShardedParams(named, mesh.get_group("dp"), dp, coords["dp"], free=zero == 3)
    return ParallelModel(mesh, stages, sched, sync, shards, info.shared_params, precision=precision,
                         activation_checkpointing=ac, zero=zero, shards=zshards, module=user)


def _split_for_training(module: nn.Module, mb_args: tuple, mb_kwargs: dict | None, n_stages: int,
                        split_spec: Mapping[str, SplitPoint] | None, split_policy: SplitPolicy | None) -> Pipe:
    """`_split`, traced in train mode where the whole model is in eval mode (`from_pretrained` returns it
    so): the stages' training graph is the one checkpointing, bf16 weight copies, compiling and CUDA
    graphs are set up on, and ParallelModel follows the model's mode from the first step on (an eval-mode
    model then runs its eval-mode graph, as it would unsplit). The model's own flags are restored; a
    model with some submodules in eval mode (frozen batch norm) is traced as it is."""
    if any(m.training for m in module.modules()):
        return _split(module, mb_args, mb_kwargs, n_stages, split_spec, split_policy)
    modes = {m: m.training for m in module.modules()}
    module.train()
    try:
        with warnings.catch_warnings():   # its batch norm runs on running statistics until model.train()
            warnings.filterwarnings("ignore", message=".* has batch norm in train mode")
            return _split(module, mb_args, mb_kwargs, n_stages, split_spec, split_policy)
    finally:
        for m, training in modes.items():
            m.training = training


def _split(module: nn.Module, mb_args: tuple, mb_kwargs: dict | None, n_stages: int,
           split_spec: Mapping[str, SplitPoint] | None, split_policy: SplitPolicy | None) -> Pipe:
    """Cut `module` as asked; without split_spec or split_policy, at its pipe_split() calls if it
    makes exactly the stages needed, else balanced by cost."""
    if split_spec is not None or split_policy is not None or n_stages == 1:
        return pipeline(module, mb_args, mb_kwargs, split_spec=split_spec, split_policy=split_policy)
    return pipeline(module, mb_args, mb_kwargs, split_policy=UnlessMarked(split_by_cost(n_stages)))


def _check_plan(pipe: Pipe, tp_plan: Mapping[str, Any]) -> None:
    """Every planned module exists somewhere in the pipe, and none holds a parameter several stages share."""
    names = {n for s in range(pipe.num_stages)
             for n, _ in pipe.get_stage_module(s).named_parameters(remove_duplicate=False)}
    modules = {n.rpartition(".")[0] for n in names}
    missing = sorted(str(k) for k in tp_plan if k not in modules)
    if missing:
        raise ValueError(f"tp_plan names module(s) {missing} that the model does not have (or that hold no "
                         f"parameters); expected names of nn.Linear modules such as 'blocks.0.mlp.fc'")
    shared = pipe.info().shared_params
    for s in range(pipe.num_stages):
        stage = pipe.get_stage_module(s)
        first = {id(p): n for n, p in stage.named_parameters()}
        for name, p in stage.named_parameters(remove_duplicate=False):  # aliases of a shared one too
            if first[id(p)] in shared and name.rpartition(".")[0] in tp_plan:
                alias = f" (the same tensor as {first[id(p)]!r})" if name != first[id(p)] else ""
                raise ValueError(f"tp_plan shards {name!r}{alias}, which several stages share (tied weights); "
                                 f"shared parameters must stay replicated: drop {name.rpartition('.')[0]!r} "
                                 f"from tp_plan")


def _plan_covers(module: nn.Module, tp_plan: Mapping[str, Any]) -> bool:
    return any(n.rpartition(".")[0] in tp_plan for n, _ in module.named_parameters(remove_duplicate=False))
