"""`ParallelModel`: what `pp.parallelize` returns, one rank's part of a pipeline x data x tensor-parallel
run (its stages, schedule and gradient sync), with torch-like step, eval, parameters, optimizer, gradient
clipping and whole-tensor state dicts."""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from pp.comms.collectives import all_reduce
from pp.comms.collectives import all_reduce_, wait_all
from pp.parallel.data_parallel import GradSync
from pp.parallel.mesh import mesh_coords
from pp.parallel.zero import ShardedParams, zero_optimizer
from pp.tp.layout import ParamShard, gather_shard, take_shard

__all__ = ["ParallelModel"]


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
                 shards: ShardedParams | None = None, module: nn.Module | None = None) -> None:
        self.mesh, self.stages, self.schedule, self.grad_sync = mesh, stages, schedule, grad_sync
        # the model given to pp.parallelize: its train/eval mode (model.train(), model.eval()) is followed
        # by the stages at the next step or eval whenever it changes, as a wrapper such as DDP follows it
        self._module = module
        if module is not None:
            flags = tuple(m.training for m in module.modules())
            # the submodule modes the traced graph holds (a wholly eval-mode model is traced in train mode),
            # which the stages start in
            self._traced_modes = self._modes = flags if any(flags) else (True,) * len(flags)
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
        self._optimizer_built = False
        self._warned_eval_training = False
        if self.dp > 1:   # a token mean (ignored targets) counts every replica's targets: the global batch's mean
            schedule._count_group = mesh.get_group("dp")
        if self.dp * self.tp > 1 and mesh.size() == dist.get_world_size():
            # every pipeline agrees on each training step: a replica refusing its batch (the caller may skip
            # it and go on) stops the others before their dp or tp collectives, which would otherwise pair
            # with the next step's (gradients of different steps averaged, then a hang at the last)
            schedule._agree = (dist.group.WORLD, self.dp_rank * self.tp + self.tp_rank, self.dp * self.tp)
        # floating buffers the forward updates (batch norm's running statistics): each replica updates
        # them from its own share of the batch; averaged after every step so that the replicas, their
        # evaluation and the checkpoint (replica 0's) agree
        info, seen = stages[0].pipe_info, set()
        mutated = set(info.mutated_buffers) if info is not None and self.dp > 1 else set()
        self._replica_buffers = []
        for st in stages:
            for name, b in st.submod.named_buffers():
                if name in mutated and b.is_floating_point() and id(b) not in seen:
                    seen.add(id(b))
                    self._replica_buffers.append(b)

    # ------------------------------------------------------------------------------- training
    def step(self, *args: Any, target: Any = None, losses: list | None = None, **kwargs: Any) -> None:
        """One training step on this replica's share of the batch: forward and backward of every
        microbatch, gradients accumulated into `.grad` and averaged over the dp replicas. Ranks of
        the first stage need the inputs, ranks of the last stage `target` (others may pass them
        too); on the last stage each microbatch's loss is appended to `losses`.

        RuntimeError at zero 1-3 before `build_optimizer` was called: only its optimizer shards the
        state (zero 1) or updates the master shards (zero 2/3; one over `parameters()` would not train)."""
        if self.zero and not self._optimizer_built:
            raise RuntimeError(
                f"zero={self.zero}: build the optimizer with ParallelModel.build_optimizer(optimizer_class, "
                f"param_groups, **defaults) before the first step; "
                + ("an optimizer over parameters() would not shard its state" if self.zero == 1 else
                   "the parameters are kept as master shards that only that optimizer updates, so an "
                   "optimizer over parameters() would not train"))
        self._follow_mode()
        if self.shards is not None and self.shards.stale():   # the whole parameters from the shards
            self.shards.gather()
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not self._warned_eval_training:
            self._warn_eval_training()
        if self.grad_sync is not None:
            self.grad_sync.finish()
        if self.shards is not None:
            self.shards.reduce_grads()
            self._release_whole_weights()
        if self._replica_buffers:
            wait_all(all_reduce_(self._replica_buffers, self.mesh.get_group("dp"), op="avg"),
                     "the data-parallel all-reduce of the replicas' buffers")

    def _warn_eval_training(self) -> None:
        """Once: a training step ran a stage on its eval-mode graph (the model is in eval mode, as
        `from_pretrained` returns it, and has dropout or batch norm), which runs eagerly, without what was
        set up on the training graph. It trains as the unsplit model in eval mode would (dropout off), but
        maybe not in the memory or time the user planned for."""
        stages = [st for st in self.stages if st.runs_other_mode and st.submod.training is False]
        if not stages:
            return
        self._warned_eval_training = True
        lost = [what for what, on in (
            (f"activation checkpointing ({self.activation_checkpointing!r})", self.activation_checkpointing != "none"),
            ("compiled stages", any(st.compiled is not None for st in stages)),
            ("CUDA graphs", any(st.graphs is not None for st in stages)),
            ("bfloat16 weight copies", any(st.bf16_weights is not None for st in stages))) if on]
        warnings.warn(
            f"pipeline rank {self.pp_rank} trains stage(s) {[st.stage_index for st in stages]} in eval mode (the "
            f"model given to pp.parallelize is in eval mode, as from_pretrained returns it): dropout is off, as "
            f"unsplit, and they run their eval-mode graph eagerly"
            + (f", without {', '.join(lost)}" if lost else "")
            + "; call model.train() before training", stacklevel=3)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Forward only; the merged output on the ranks of the last stage, None elsewhere. In the
        model's mode: call `model.eval()` first for dropout off and batch norm's running statistics."""
        self._follow_mode()
        if self.shards is not None and self.shards.stale():
            self.shards.gather()
        try:
            return self.schedule.eval(*args, **kwargs)
        finally:
            if self.shards is not None:
                self._release_whole_weights()

    def _follow_mode(self) -> None:
        """Switch the stages to the model's mode where `model.train()`/`model.eval()` changed it since
        the last step (a stage switched by hand, `stage.submod.eval()`, stays so until the model's mode
        changes). A traced stage runs one of two graphs: the submodule modes it was traced with, or the
        whole model in the other mode; any other mix (one submodule switched after parallelize) cannot be
        run, and is a ValueError naming the submodule, as is a stage that cannot switch (pp.stage.modes)."""
        if self._module is None:
            return
        modes = tuple(m.training for m in self._module.modules())
        if modes == self._modes:
            return
        traced = self._traced_modes
        if len(modes) != len(traced):
            raise ValueError("the model given to pp.parallelize gained or lost submodules since; rebuild it "
                             "with pp.parallelize")
        if modes == traced:
            mode = traced[0]
        elif modes == (not traced[0],) * len(modes):
            mode = not traced[0]
        else:
            off = next(i for i, (a, b) in enumerate(zip(modes, traced)) if a != b)
            names = [n for n, _ in self._module.named_modules()]
            def what(flag: bool) -> str:
                return "train" if flag else "eval"
            raise ValueError(
                f"submodule {names[off] or type(self._module).__name__!r} of the model is in "
                f"{what(modes[off])} mode, but pp.parallelize traced it in {what(traced[off])} mode, and a "
                f"traced stage runs only the modes it was traced with or the whole model in the other mode: set "
                f"submodule modes (a frozen batch norm's .eval()) before pp.parallelize, and switch the whole "
                f"model with model.train()/model.eval() after")
        self._modes = modes
        for st in self.stages:
            st.submod.train(mode)

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
        `optimizer_class` over the master shards (zero 2/3, which `step` keeps in sync). At zero 1-3
        `step` refuses to run before this was called.
        `param_groups` (dicts whose "params" are parameters of `parameters()`) default to one group."""
        groups = param_groups if param_groups is not None else [{"params": list(self.parameters())}]
        if self.shards is not None:
            groups = [{**g, "params": [self.shards.master_of[id(p)] for p in g["params"]
                                       if id(p) in self.shards.master_of]} for g in groups]
        self._optimizer_built = True
        if self.zero == 1:
            return zero_optimizer(groups, optimizer_class, self.mesh.get_group("dp"), **defaults)
        optimizer = optimizer_class(groups, **defaults)
        if self.shards is not None and not self.shards.free:
            # ZeRO 2 keeps the whole parameters between steps: gathered right after each optimizer step
            # (as DeepSpeed does), so the module, parameters() and a save of it hold the new values
            optimizer.register_step_post_hook(lambda *_: self.shards.gather() if self.shards.stale() else None)
        return optimizer

    def optimizer_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, tensor the optimizer updates) for each parameter: the parameter itself, or its master
        shard at zero 2/3."""
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
        return self._norm_share(2.0)

    def _norm_share(self, p: float) -> torch.Tensor:
        """This rank's share of the global gradient norm of order `p` (float32): the sum of |g|^p over
        the parameters it counts (see `_norm_params`), or their max for p = inf."""
        grads = [q.grad for q in self._norm_params() if q.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=self.stages[0].device)
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads, p)])
        return norms.max() if math.isinf(p) else norms.pow(p).sum()

    def clip_grad_norm_(self, max_norm: float | torch.Tensor, norm_type: float | str = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Scale every gradient so that the global norm is at most `max_norm`, as
        `torch.nn.utils.clip_grad_norm_` does for the unsplit model: the norm is over every parameter of
        every stage, replica and tp shard once (collective over all ranks), and each gradient is
        multiplied by min(1, max_norm / (norm + 1e-6)).

        `max_norm` is a number ≥ 0 or a one-element tensor (as torch's; a tensor is not read on the host);
        `norm_type` any p > 0 or `inf`, as a number or a string such as "inf" (torch's `float(norm_type)`).
        Returns the total norm before clipping: a float32 0-dim tensor on this rank's device, the same on
        every rank (`.item()` it to log). No host sync, unless `error_if_nonfinite`. Raises ValueError for
        a negative or non-numeric `max_norm` or a `norm_type` that is not a positive number, and
        RuntimeError (torch's) for a NaN or infinite norm when `error_if_nonfinite`."""
        if isinstance(max_norm, torch.Tensor):
            if max_norm.numel() != 1 or max_norm.is_complex() or max_norm.dtype == torch.bool:
                raise ValueError(f"max_norm must be a number or a one-element real tensor, got a {max_norm.dtype} "
                                 f"tensor of shape {tuple(max_norm.shape)}")
            max_norm = max_norm.reshape(()).float()
        elif isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
            raise ValueError(f"max_norm must be a number ≥ 0 or a one-element tensor, got {max_norm!r}")
        try:
            p = float(norm_type) if not isinstance(norm_type, bool) else math.nan
        except (TypeError, ValueError):
            p = math.nan
        if not p > 0:
            raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
        share = self._norm_share(p)
        total = all_reduce(share, "max") if math.isinf(p) else all_reduce(share, "sum").pow(1.0 / p)
        if error_if_nonfinite and not torch.isfinite(total).item():
            raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is "
                               f"non-finite, so it cannot be clipped. To disable this error and scale the "
                               f"gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        if isinstance(max_norm, torch.Tensor):
            max_norm = max_norm.to(total.device)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in self.grads():
            by_device.setdefault(g.device, []).append(g)
        for device, gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(device))
        return total

    def scale_grads(self, factor: float) -> None:
        """Multiply this rank's gradients by `factor` in place (a rank whose parameters are all frozen,
        or got no gradient this step, has none: nothing to do)."""
        grads = self.grads()
        if grads:
            torch._foreach_mul_(grads, factor)

    def _norm_params(self) -> list[nn.Parameter]:
        if self.dp_rank != 0 and self.shards is None:       # replicas hold the same averaged gradients
            return []
        out, seen = [], set()
        for stage in self.stages:
            for name, p in stage.submod.named_parameters():
                owner = min(self._shared.get(name, [stage.stage_index]))
                if owner != stage.stage_index or id(p) in seen or not p.requires_grad:
                    continue   # a frozen parameter has no gradient, and at zero 2/3 no master shard
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
            for name, t in stage.submod.state_dict(keep_vars=True).items():
                if name in sharded:  # ZeRO 2/3: the master shards hold the values (collective over dp)
                    t = self.shards.whole(sharded[name], self.shards.master(sharded[name])).to(t.dtype)
                t = t.detach()
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
