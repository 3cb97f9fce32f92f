"""`pp.parallelize`: a model in, this rank's part of a pipeline × data × tensor-parallel run out.

Every rank traces and cuts the model alike, keeps the stages its pipeline rank holds, rewrites them for
tensor parallelism within its tp group, and runs them with a schedule over its pp group; gradients
are averaged over its dp group during the step. See the README, "Pipeline × data × tensor parallelism".
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from pp.comms.collectives import all_reduce
from pp.parallel.checkpointing import apply_checkpointing, check_mode
from pp.parallel.data_parallel import GradSync
from pp.parallel.mesh import check_mesh, make_mesh, mesh_coords
from pp.parallel.meta import fill, is_meta, materialize, to_meta
from pp.parallel.precision import apply_precision, cast_module, check_precision
from pp.parallel.zero import ShardedParams, check_zero, zero_optimizer
from pp.stage.marker import SplitPoint
from pp.stage.pipe import Pipe
from pp.stage.policies import SplitPolicy, split_by_cost
from pp.stage.split import pipeline
from pp.tp.layout import ParamShard, gather_shard, take_shard

__all__ = ["ParallelModel", "parallelize"]


class ParallelModel:
    """This rank's part of a model trained with `pp.parallelize`: its stages, their schedule, and the
    gradient synchronisation that makes one `step` equal one step of the unsplit model.

    Parameter names are the model's own. `step` takes this data-parallel replica's share of the
    global batch (`local_share` cuts it); losses and gradients then equal those of the whole model
    on the global batch, with the loss being the mean over all replicas' microbatches.
    """

    def __init__(self, mesh: DeviceMesh, stages: list, schedule: Any, grad_sync: GradSync | None,
                 tp_shards: dict[str, ParamShard], shared_params: Mapping[str, list[int]], *,
                 precision: str = "fp32", activation_checkpointing: str = "none", zero: int = 0,
                 shards: ShardedParams | None = None) -> None:
        self.mesh, self.stages, self.schedule, self.grad_sync = mesh, stages, schedule, grad_sync
        self.precision, self.activation_checkpointing, self.zero = precision, activation_checkpointing, zero
        self.shards = shards    # ZeRO 2/3: the master shards the optimizer updates
        self.tp_shards = dict(tp_shards)
        coords = mesh_coords(mesh)
        self.pp_rank, self.dp_rank, self.tp_rank = coords["pp"], coords["dp"], coords["tp"]
        self.pp, self.dp, self.tp = (mesh.size(i) for i in range(3))
        self._shared = dict(shared_params)
        n_stages = stages[0].num_stages
        ids = [s.stage_index for s in stages]
        self.has_first_stage, self.has_last_stage = 0 in ids, n_stages - 1 in ids

    # ------------------------------------------------------------------------------- training
    def step(self, *args: Any, target: Any = None, losses: list | None = None, **kwargs: Any) -> None:
        """One training step on this replica's share of the batch: forward and backward of every
        microbatch, gradients accumulated into `.grad` and averaged over the dp replicas. Ranks of
        the first stage need the inputs, ranks of the last stage `target` (others may pass them
        too); on the last stage each microbatch's loss is appended to `losses`."""
        if self.shards is not None:   # the whole parameters from the shards the optimizer updated
            self.shards.gather()
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if self.grad_sync is not None:
            self.grad_sync.finish()
        if self.shards is not None:
            self.shards.reduce_grads()
            self._release_whole_weights()

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only; the merged output on the ranks of the last stage, None elsewhere."""
        if self.shards is not None:
            self.shards.gather()
        try:
            return self.schedule.eval(*args, **kwargs)
        finally:
            if self.shards is not None:
                self._release_whole_weights()

    def _release_whole_weights(self) -> None:
        """ZeRO 3: free the whole parameters between steps, and their bfloat16 copies (bf16-mixed)."""
        self.shards.release()
        if self.shards.free:
            for stage in self.stages:
                if stage.bf16_weights is not None and stage.graphs is None:
                    stage.bf16_weights.release()

    def build_optimizer(self, optimizer_class: type = torch.optim.AdamW, param_groups: list[dict] | None = None,
                        **defaults: Any) -> torch.optim.Optimizer:
        """The optimizer for this rank's parameters at this model's ZeRO level: `optimizer_class`
        itself (zero 0), torch's ZeroRedundancyOptimizer of it over the dp group (zero 1), or
        `optimizer_class` over the float32 master shards (zero 2/3, which `step` keeps in sync).
        `param_groups` (dicts whose "params" are parameters of `parameters()`) default to one group."""
        groups = param_groups if param_groups is not None else [{"params": list(self.parameters())}]
        if self.shards is not None:
            groups = [{**g, "params": [self.shards.master_of[id(p)] for p in g["params"]
                                       if id(p) in self.shards.master_of]} for g in groups]
        if self.zero == 1:
            return zero_optimizer(groups, optimizer_class, self.mesh.get_group("dp"), **defaults)
        return optimizer_class(groups, **defaults)

    def optimizer_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, tensor the optimizer updates) for each parameter: the parameter itself, or its float32
        master shard at zero 2/3."""
        if self.shards is not None:
            return list(zip(self.shards.names, self.shards.masters))
        return list(self.named_parameters())

    def grads(self) -> list[torch.Tensor]:
        """The gradients the optimizer reads (the master shards' at zero 2/3), for scaling them."""
        return [p.grad for _, p in self.optimizer_params() if p.grad is not None]

    def local_share(self, batch: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This replica's share of a global `batch`: the dp_rank-th of dp equal chunks along `dim`."""
        if batch.shape[dim] % self.dp:
            raise ValueError(f"a batch of {batch.shape[dim]} along dim {dim} does not divide into "
                             f"dp={self.dp} equal shares")
        return batch.chunk(self.dp, dim)[self.dp_rank]

    @property
    def owns_loss(self) -> bool:
        """Whether this rank's losses count in a global mean: the last stage's rank of tp index 0
        (the other tp ranks compute the same losses)."""
        return self.has_last_stage and self.tp_rank == 0

    # ----------------------------------------------------------------------------- parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of this rank's stages, each parameter once; tp-sharded ones are local."""
        seen: set[int] = set()
        for stage in self.stages:
            for name, p in stage.submod.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in [*self.parameters(), *(self.shards.masters if self.shards is not None else ())]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def grad_norm_sq(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm (float32): summed over all ranks it
        counts every parameter once, tp shards once each, replicas and shared copies once."""
        grads = [p.grad for p in self._norm_params() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.stages[0].device)
        return torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).square().sum()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every gradient so that the global norm is at most `max_norm`; return the norm before.
        Collective over all ranks."""
        if not max_norm > 0:
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        norm = math.sqrt(all_reduce(self.grad_norm_sq(), "sum").item())
        if norm > max_norm:
            torch._foreach_mul_(self.grads(), max_norm / (norm + 1e-6))
        return norm

    def _norm_params(self) -> list[nn.Parameter]:
        if self.dp_rank != 0 and self.shards is None:       # replicas hold the same averaged gradients
            return []
        out, seen = [], set()
        for stage in self.stages:
            for name, p in stage.submod.named_parameters():
                owner = min(self._shared.get(name, [stage.stage_index]))
                if owner != stage.stage_index or id(p) in seen:
                    continue
                if self.tp_rank == 0 or name in self.tp_shards:
                    seen.add(id(p))
                    out.append(p if self.shards is None else self.shards.master_of[id(p)])
        return out

    # ------------------------------------------------------------------- full and local tensors
    def full_tensor(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor for parameter `name` from its local part (a tp all-gather for sharded
        ones, collective over the tp group; `local` itself otherwise). Also for optimizer state."""
        shard = self.tp_shards.get(name)
        return local if shard is None else gather_shard(local, shard, self.mesh.get_group("tp"))

    def local_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor `full` of parameter `name`."""
        shard = self.tp_shards.get(name)
        return full if shard is None else take_shard(full, shard, self.tp_rank, self.tp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's stages' parameters and buffers as whole tensors under the model's names
        (collective over the tp group)."""
        out: dict[str, torch.Tensor] = {}
        sharded = self._sharded_names()
        for stage in self.stages:
            for name, t in stage.submod.state_dict().items():
                if name in sharded:  # ZeRO 2/3: the master shards hold the values (collective over dp)
                    t = self.shards.whole(sharded[name], self.shards.master(sharded[name])).to(t.dtype)
                out[name] = self.full_tensor(name, t)
        return out

    def _sharded_names(self) -> dict[str, str]:
        """ZeRO 2/3: every name of a sharded parameter (tied aliases too) -> the name it is sharded under."""
        if self.shards is None:
            return {}
        first = {id(p): n for n, p in zip(self.shards.names, self.shards.params)}
        return {n: first[id(p)] for st in self.stages
                for n, p in st.submod.named_parameters(remove_duplicate=False) if id(p) in first}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy whole tensors (as from `state_dict` or the unsplit model) into this rank's parts.

        Collective over all ranks. Every rank checks first and none copies unless all fit, so a bad
        `state` raises the same `pp.weights.WeightsError` (a ValueError listing the missing, unexpected
        and mis-shaped keys) everywhere and leaves every weight as it was. A tensor tied under several
        names needs only one of them. With ZeRO 2/3 shards, each rank fills its shards of the masters.
        """
        from pp.weights import load_weights

        load_weights(self, state)

    def __repr__(self) -> str:
        ids = [s.stage_index for s in self.stages]
        return (f"ParallelModel(pp={self.pp}, dp={self.dp}, tp={self.tp}; rank (pp {self.pp_rank}, "
                f"dp {self.dp_rank}, tp {self.tp_rank}) holds stages {ids})")


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
    compile_per: str = "block",
    precision: str = "fp32",
    activation_checkpointing: str = "none",
    zero: int = 0,
    init_fn: Callable[[str, torch.Tensor], None] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> ParallelModel:
    """Build this rank's part of `module` trained with pp × dp × tp parallelism; collective.

    `mb_args`/`mb_kwargs` are one microbatch of this replica (local batch / n_microbatches), used to
    trace; `module` may also be a `Pipe` already cut. The cut follows `split_spec`, `split_policy`,
    the model's `pipe_split()` calls, or else `split_by_cost`. `tp_plan` maps module names to
    `pp.tp.ColwiseParallel`/`RowwiseParallel`. `pp` defaults to world / (dp * tp); `mesh`, if given,
    is a (pp, dp, tp) DeviceMesh (`pp.parallel.make_mesh`) whose sizes win. `device` defaults to
    cuda:LOCAL_RANK when CUDA is available, else cpu. `cuda_graphs=True` replays the stages as CUDA
    graphs from the second step on (`schedule.enable_cuda_graphs()`; not with tp > 1). `compile=True` runs
    each stage's forward and backward through torch.compile, per block or per stage (`compile_per`
    "block" or "stage"; `schedule.compile()`); compiles happen at the first step, once per input shape.

    `precision`: "fp32", "bf16-mixed" (float32 parameters, gradients and optimizer state; each stage computes
    with bfloat16 copies of its matrices, refreshed once per step, under bfloat16 autocast; activations cross
    stages in bfloat16; pp.parallel.precision) or "bf16" (everything bfloat16).
    `activation_checkpointing`: "none", "selective" (recompute element-wise ops, keep matmul and attention
    outputs) or "full" (recompute each block in backward). `zero`: 0 (replicated), 1 (optimizer state
    sharded over dp), 2 (also gradients), 3 (also parameters between steps); build the optimizer with
    `ParallelModel.build_optimizer`. A `module` on the meta device is traced there and each rank fills
    only its own stages' tensors: from `state_dict` (whole tensors under the model's names) or with
    `init_fn(name, tensor)` (e.g. seeded by `pp.parallel.meta.generator_for(seed, name)`).
    ValueError for an unknown precision, checkpointing mode or ZeRO level. Tensor hooks and
    post-accumulate-grad hooks on the parameters run once per microbatch; hooks put on their
    AccumulateGrad nodes run only with `stage.node_hooks = True` on the stages (`ParallelModel.stages`).
    """
    from pp.comms.backend import default_device, get_world_size
    from pp.schedules.classes import PipelineScheduleSingle, schedule_class
    from pp.schedules.registry import get_spec
    from pp.stage.runtime import build_stage
    from pp.tp.stage import shard_stage_module

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
    if compile_per not in ("block", "stage"):
        raise ValueError(f"compile_per={compile_per!r} is not a compile granularity; expected 'block' or 'stage'")
    precision = check_precision(precision)
    ac = check_mode(activation_checkpointing)
    if compile and compile_per == "stage" and ac != "none":
        raise ValueError(f"compile_per='stage' with activation_checkpointing={ac!r}: the recompute is not "
                         f"traced into a compiled stage; use compile_per='block'")
    zero = check_zero(zero, dp)
    if cuda_graphs and zero == 3:
        raise ValueError("cuda_graphs=True with zero=3: ZeRO 3 frees the whole parameters between steps, and "
                         "a replayed graph reads them where it was captured; use zero=1 or 2, or cuda_graphs=False")
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be callable (name, tensor) -> None, got {type(init_fn).__name__}")
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must map parameter names to tensors, got {type(state_dict).__name__}")
    on_meta = is_meta(module)
    if on_meta and init_fn is None and state_dict is None:
        raise ValueError("the model is on the meta device: pass init_fn=(name, tensor) -> None or a state_dict "
                         "to fill each rank's stages")
    device = torch.device(device) if device is not None else default_device()
    spec = get_spec(schedule)
    n_stages = spec.n_stages(pp, stages_per_rank)
    if mesh is None:
        mesh = make_mesh(pp, dp, tp)
    coords = mesh_coords(mesh)

    if isinstance(module, Pipe) and (split_spec is not None or split_policy is not None):
        raise ValueError("module is a Pipe, already cut: drop split_spec/split_policy")
    if on_meta and not isinstance(module, Pipe):
        mb_args, mb_kwargs = to_meta(tuple(mb_args)), to_meta(mb_kwargs)
    if precision == "bf16" and not on_meta and not isinstance(module, Pipe):
        cast_module(module, precision)
    pipe = module if isinstance(module, Pipe) else _split(module, mb_args, mb_kwargs, n_stages,
                                                          split_spec, split_policy)
    if pipe.num_stages != n_stages:
        raise ValueError(f"the model is cut into {pipe.num_stages} stages, but schedule {spec.name} with "
                         f"pp={pp} needs {n_stages}")
    info = pipe.info()
    if tp > 1:
        _check_plan(pipe, tp_plan)
    placement = spec.placement(n_stages, pp)
    stages, shards = [], {}
    for s in (s for s, r in enumerate(placement) if r == coords["pp"]):
        mod = pipe.get_stage_module(s)
        if is_meta(mod):  # only this rank's stages get storage, filled whole before any tp cut
            materialize(mod, device)
            fill(mod, init_fn, state_dict)
        elif state_dict is not None:
            fill(mod, None, state_dict)
        if precision == "bf16":
            cast_module(mod, precision)
        if tp > 1 and _plan_covers(mod, tp_plan):
            mod = shard_stage_module(mod, None, coords["tp"], tp, device.type, tp_plan, group=mesh.get_group("tp"))
            shards.update(mod.tp_shards)
        stage = build_stage(mod, s, info, device, group=mesh.get_group("pp"))
        apply_precision(stage, precision)
        apply_checkpointing(stage.submod, ac, once=spec.split_backward)
        stage.node_hooks = False  # nothing of pp's hooks AccumulateGrad nodes: W adds into .grad itself

        stages.append(stage)
    cls = schedule_class(spec.name)
    target = stages[0] if issubclass(cls, PipelineScheduleSingle) else stages
    sched = cls(target, n_microbatches, loss_fn=loss_fn)
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
                         activation_checkpointing=ac, zero=zero, shards=zshards)


def _split(module: nn.Module, mb_args: tuple, mb_kwargs: dict | None, n_stages: int,
           split_spec: Mapping[str, SplitPoint] | None, split_policy: SplitPolicy | None) -> Pipe:
    """Cut `module` as asked; without split_spec or split_policy, at its pipe_split() calls if it
    makes exactly the stages needed, else balanced by cost."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or a pp.Pipe, got {type(module).__name__}")
    if split_spec is not None or split_policy is not None or n_stages == 1:
        return pipeline(module, mb_args, mb_kwargs, split_spec=split_spec, split_policy=split_policy)
    pipe = pipeline(module, mb_args, mb_kwargs)
    if pipe.num_stages == 1:
        pipe = pipeline(module, mb_args, mb_kwargs, split_policy=split_by_cost(n_stages))
    return pipe


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
