"""What one rank of `pp.run` holds: its part of the model (stages, schedule, gradient sync), the
optimizer, and the state both save to and load from a checkpoint, whatever layout wrote it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import pp
from pp.parallel import ParallelModel, make_mesh
from pp.losses import chunked_cross_entropy
from pp.parallel import zero

from . import checkpoint as ckpt
from .job import Job
from .models import init_fn


def lm_loss(logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a microbatch, computed in float32; large logits in row chunks
    recomputed in backward (`pp.losses.chunked_cross_entropy`), so the last stage's peak memory is not
    set by float32 copies of them. A model that returns (logits, aux_loss), aux_loss a 0-dim tensor (a
    mixture-of-experts load-balancing loss, already scaled by its coefficient), has it added."""
    if isinstance(logits, (tuple, list)):
        logits, aux = logits
        return chunked_cross_entropy(logits, targets) + aux.float()
    return chunked_cross_entropy(logits, targets)


def _data_loss(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """`lm_loss` as pp.run's schedules call it."""
    return lm_loss(out, targets)


# pp.run's targets are token ids read from its data, never -100: no target is ignored, so the microbatches'
# row shares are exact and the step counts none (no count kernels, no all-reduce over the replicas)
_data_loss.ignore_index = None


def next_token_loss(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """`lm_loss` without an auxiliary loss: the validation loss (its perplexity means next-token prediction)."""
    return chunked_cross_entropy(out[0] if isinstance(out, (tuple, list)) else out, targets)


@dataclass
class RankState:
    """What this rank holds: its part of the model (stages, schedule, gradient sync) and the optimizer."""

    model: ParallelModel
    named_params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer

    @property
    def schedule(self) -> Any:
        return self.model.schedule

    @property
    def stage_ids(self) -> list[int]:
        return [s.stage_index for s in self.model.stages]

    @property
    def has_first(self) -> bool:
        return self.model.has_first_stage

    @property
    def has_last(self) -> bool:
        return self.model.has_last_stage

    def state(self) -> dict:
        """The state to save, as whole tensors (tp shards gathered, and ZeRO 2/3 shards: collective over
        the tp and dp groups). Replicas other than the first add nothing, except at ZeRO 1, where each
        adds the optimizer state of the parameters it owns."""
        m = self.model
        if m.dp_rank != 0 and m.zero == 0:
            return {}
        model = m.state_dict() if m.dp_rank == 0 or m.shards is not None else {}
        optim = {f: {k: self._whole(f, o, v) for k, v in st.items()}
                 for f, (_, o, st) in self._optim_entries().items()}
        if m.dp_rank != 0:
            return {"optim": optim} if m.zero == 1 else {}
        return {"model": model, "optim": optim}

    def load(self, path: str) -> None:
        """Fill the model and optimizer from checkpoint `path`, whatever layout saved it (collective)."""
        m = self.model
        local = {n: t for stage in m.stages for n, t in stage.submod.state_dict(keep_vars=True).items()}
        model = {n: torch.empty(self._whole_shape(n, t.shape), dtype=t.dtype) for n, t in local.items()}
        entries = self._optim_entries()
        optim = {f: {k: torch.empty(self._whole_shape(f, p.shape), dtype=v.dtype) if self._sharded(o, v) else v
                     for k, v in st.items()} for f, (p, o, st) in entries.items()}
        ckpt.load(path, {"model": model, "optim": optim})
        m.load_state_dict(model)
        with torch.no_grad():
            for f, (_, o, st) in entries.items():
                for k, v in st.items():
                    if self._sharded(o, v):
                        part = m.local_tensor(f, optim[f][k])
                        v.copy_(m.shards.shard(f, part) if m.shards is not None else part)

    def _optim_entries(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
        """{name: (parameter, the tensor the optimizer updates, its state)} for every parameter whose
        optimizer state this rank holds: all of them, or at ZeRO 1 those this replica owns."""
        m, params = self.model, dict(self.named_params)
        if m.zero == 1:
            owned = [(f, p) for f, p in self.named_params if zero.owned_by(self.optimizer, p, m.dp_rank)]
            st = ckpt.optimizer_state(owned, self.optimizer.optim)
            return {f: (p, p, st[f]) for f, p in owned}
        named = m.optimizer_params()
        st = ckpt.optimizer_state(named, self.optimizer)
        return {f: (params[f], t, st[f]) for f, t in named}

    @staticmethod
    def _sharded(updated: torch.Tensor, t: torch.Tensor) -> bool:
        """Whether optimizer state `t` is shaped like its parameter (sharded like it); a step count is not."""
        return t.dim() > 0 and t.shape == updated.shape

    def _whole(self, name: str, updated: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self._sharded(updated, t):
            return t
        if self.model.shards is not None:
            t = self.model.shards.whole(name, t)
        return self.model.full_tensor(name, t)

    def _whole_shape(self, name: str, shape: torch.Size) -> list[int]:
        """The shape of the whole tensor of `name` whose local (tp) part has `shape`."""
        out = list(shape)
        shard = self.model.tp_shards.get(name)
        if shard is not None and len(out) > shard.dim:
            out[shard.dim] = shard.whole(out[shard.dim], self.model.tp)
        return out


def make_model(job: Job, device: torch.device) -> ParallelModel:
    """This rank's part of the model over a (pp, dp, tp) mesh of the default group."""
    cfg, layout = job.cfg, job.layout
    mesh = make_mesh(layout.pp, cfg.parallel.dp, cfg.parallel.tp, device.type)
    t = cfg.train
    model = pp.parallelize(job.pipe, n_microbatches=cfg.schedule.microbatches, loss_fn=_data_loss,
                           schedule=layout.schedule, stages_per_rank=layout.stages_per_rank,
                           tp_plan=job.tp_plan, device=device, mesh=mesh,
                           cuda_graphs=cfg.schedule.cuda_graphs and device.type == "cuda",
                           compile=cfg.schedule.compile, compile_per=cfg.schedule.compile_per,
                           precision=t.precision, activation_checkpointing=t.activation_checkpointing,
                           zero=cfg.parallel.zero if cfg.parallel.dp > 1 else 0,
                           init_fn=init_fn(cfg.model, t.seed))
    for stage in model.stages:   # bf16-mixed: activations cross in bfloat16 unless asked to go as computed
        stage.cast_activations = t.activations_in_bf16
    model.schedule.record_trace = True  # per-action timings for the bubble fraction and trace.json
    if cfg.schedule.cuda_graphs and device.type != "cuda" and mesh.get_rank() == 0:
        print("pp.run: schedule.cuda_graphs=true has no effect on cpu: the stages run eagerly", flush=True)
    return model


def build_rank(job: Job, device: torch.device) -> RankState:
    """Build this rank's stages, schedule and optimizer."""
    cfg = job.cfg
    model = make_model(job, device)
    named = list(model.named_parameters())
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # torch's fused AdamW on GPUs: one kernel over all parameters (bf16-mixed's float32 state: 43 -> 17 ms
    # per step for 1.6B parameters on one H200); foreach elsewhere
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = model.build_optimizer(torch.optim.AdamW, groups, lr=cfg.train.lr,
                                      betas=(cfg.train.beta1, cfg.train.beta2), **fused)
    return RankState(model, named, optimizer)
