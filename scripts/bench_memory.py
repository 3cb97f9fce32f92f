"""Memory and speed of precision, activation checkpointing and ZeRO (issue 17): pp beside
torch.distributed.pipelining, one JSON line per configuration.

    torchrun --nproc-per-node 2 scripts/bench_memory.py --out bench/results/memory.jsonl          # 2 GPUs
    torchrun --nproc-per-node 2 scripts/bench_memory.py --smoke --out /tmp/m.jsonl                # CPU, tiny

A configuration is `impl:schedule:ac:precision:zero:pp:dp` (impl pp or torch; ac none/selective/full;
precision bf16-mixed/bf16/fp32, or for pp bf16-mixed-percast: bf16-mixed as pp ran it before its bfloat16
weight copies, every weight cast under autocast in every microbatch, to compare in the same run; zero 0-3). The default list (`--configs`): GPT with 1F1B and ZBVZeroBubble at
pp = world, each checkpointing mode, bf16-mixed and bf16, for both runtimes; then pp 1 x dp = world with
zero 0, 1 and 3 (pp only); torch's ZBVZeroBubble with checkpointing only with --include-failing (on the CPU
with torch 2.13 it fails on one rank and the other waits). pp runs through `pp.parallelize` (the model built on the meta device, each rank
filling its own stages); torch through torch.distributed.pipelining with the same blocks cut by hand
(the `--split` is even over blocks; embedding on the first stage, norm and head on the last), blocks
wrapped in torch.utils.checkpoint(use_reentrant=False) (selective: pp's `selective_policy`), bf16-mixed
as autocast around each stage's forward, bf16 as a bfloat16 model.

Measured per configuration, per rank: peak memory (GPU: torch.cuda.max_memory_allocated from the model
build on, so parameters, gradients, optimizer state and activations; CPU: the growth of the peak resident
set over the same span), and the mean step time over `--steps` after `--warmup` (forward, backward and the
AdamW step); tokens/s counts every replica's tokens. A configuration that fails (out of memory, say)
is recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pp.launcher.config import ModelConfig  # noqa: E402
from pp.launcher.models import GPT, init_fn  # noqa: E402
from pp.launcher.train import lm_loss  # noqa: E402

SCHEDULES = ("1F1B", "ZBVZeroBubble")


def default_configs(world: int, include_failing: bool = False) -> list[str]:
    out = []
    for sched in SCHEDULES:
        for precision in ("bf16-mixed", "bf16"):
            for ac in ("none", "selective", "full"):
                for impl in ("pp", "torch"):
                    if impl == "torch" and sched != "1F1B" and ac != "none" and not include_failing:
                        continue  # torch's I/W split with checkpointed blocks: the job fails or hangs (CPU, 2.13)
                    out.append(f"{impl}:{sched}:{ac}:{precision}:0:{world}:1")
    if world > 1:
        out += [f"pp:1F1B:none:bf16-mixed:{z}:1:{world}" for z in (0, 1, 3)]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=None, help="comma-separated impl:schedule:ac:precision:zero:pp:dp")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mb-size", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for every configuration")
    p.add_argument("--include-failing", action="store_true",
                   help="also torch's ZBVZeroBubble with checkpointing, which failed (hung) on CPU with torch 2.13")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks that every path runs")
    p.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.heads, args.seq, args.vocab = 4, 32, 2, 16, 64
        args.microbatches, args.warmup, args.steps = 4, 1, 1
    return args


# ------------------------------------------------------------------------------------- memory
def _peak_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _peak_bytes(device: torch.device, start: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM") - start


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


# ------------------------------------------------------------------------------------ models
def model_cfg(args) -> ModelConfig:
    return ModelConfig(name="gpt", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=args.heads, seq_len=args.seq)


class _Slice(nn.Module):
    """A hand-cut stage of the GPT for torch.distributed.pipelining: blocks[lo:hi], with the embeddings
    on the first stage and the norm and head on the last."""

    def __init__(self, gpt: GPT, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.tok_emb, self.pos_emb = gpt.tok_emb, gpt.pos_emb
        self.blocks = nn.ModuleList(gpt.blocks[lo:hi])
        if last:
            self.norm, self.lm_head = gpt.norm, gpt.lm_head

    def forward(self, x):
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x)) if self.last else x


def _torch_checkpoint(block: nn.Module, ac: str) -> None:
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from pp.parallel.checkpointing import selective_policy

    inner = block.forward
    extra = {"context_fn": functools.partial(create_selective_checkpoint_contexts, selective_policy)} \
        if ac == "selective" else {}
    block.forward = lambda *a: checkpoint(inner, *a, use_reentrant=False, **extra)


def _autocast(module: nn.Module, device: torch.device) -> None:
    inner = module.forward

    def forward(*a):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = inner(*a)
        return out if module.last else out.to(torch.bfloat16)
    module.forward = forward


def build_torch(args, sched: str, ac: str, precision: str, pp_size: int, device: torch.device, rank: int):
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    per_rank = 2 if sched == "ZBVZeroBubble" else 1
    n_stages = pp_size * per_rank
    mine = [rank] if per_rank == 1 else [rank, n_stages - 1 - rank]
    with torch.device("meta"):
        gpt = GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq)
    bounds = [round(i * args.layers / n_stages) for i in range(n_stages + 1)]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    stages, params = [], []
    for s in mine:
        mod = _Slice(gpt, bounds[s], bounds[s + 1], s == 0, s == n_stages - 1)
        mod.to_empty(device=device)
        fill = init_fn(model_cfg(args), 0)
        with torch.no_grad():
            for name, p in mod.named_parameters():
                fill(name, p)
        mod.to(dtype)
        if ac != "none":
            for b in mod.blocks:
                _torch_checkpoint(b, ac)
        if precision == "bf16-mixed":
            _autocast(mod, device)
        params += list(mod.parameters())
        stages.append(PipelineStage(mod, s, n_stages, device))
    cls = get_schedule_class(sched)
    target = stages if per_rank > 1 else stages[0]
    schedule = cls(target, args.microbatches, loss_fn=lm_loss)
    first, last = 0 in mine, n_stages - 1 in mine

    def step(x, y):
        kw = {"target": y} if last else {}
        schedule.step(x, **kw) if first else schedule.step(**kw)
    return step, params


def _adamw_kwargs(args) -> dict:
    return {"lr": 1e-4, **({"fused": True} if args.fused_adamw else {})}


def build_pp(args, sched: str, ac: str, precision: str, zero: int, pp_size: int, dp: int, device):
    import pp
    from pp.parallel import precision as precision_mod

    with torch.device("meta"):
        gpt = GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq)
    mb = torch.zeros(args.mb_size, args.seq, dtype=torch.long)
    percast = precision == "bf16-mixed-percast"   # pp's bf16-mixed before its weight copies
    precision_mod.WEIGHT_COPIES = not percast
    try:
        par = pp.parallelize(gpt, (mb,), n_microbatches=args.microbatches, loss_fn=lm_loss, pp=pp_size, dp=dp,
                             schedule=sched, device=device, precision="bf16-mixed" if percast else precision,
                             activation_checkpointing=ac, zero=zero, init_fn=init_fn(model_cfg(args), 0))
    finally:
        precision_mod.WEIGHT_COPIES = True
    opt = par.build_optimizer(torch.optim.AdamW, **_adamw_kwargs(args))

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        par.step(par.local_share(x), target=par.local_share(y))
        opt.step()
    return step, None, opt


def run_config(args, spec: str, device: torch.device) -> dict:
    import torch.distributed as dist

    impl, sched, ac, precision, zero, pp_size, dp = spec.split(":")
    zero, pp_size, dp = int(zero), int(pp_size), int(dp)
    rank = dist.get_rank()
    start = _peak_reset(device)
    if impl == "pp":
        step, _, _ = build_pp(args, sched, ac, precision, zero, pp_size, dp, device)
    else:
        step_fwd, params = build_torch(args, sched, ac, precision, pp_size, device, rank)
        opt = torch.optim.AdamW(params, **_adamw_kwargs(args))

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            step_fwd(x, y)
            opt.step()
    batch = args.mb_size * args.microbatches * dp
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (batch, args.seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()   # torch checks input strides
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"peak_bytes": _peak_bytes(device, start), "step_s": sum(times) / len(times)}


def main(argv=None) -> int:
    import torch.distributed as dist

    args = parse_args(argv)
    warnings.simplefilter("ignore")
    use_cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    configs = args.configs.split(",") if args.configs else default_configs(world, args.include_failing)
    for spec in configs:
        try:
            got, error = run_config(args, spec, device), None
        except Exception as e:  # noqa: BLE001 - recorded (out of memory, say), the next one runs
            got, error = {"peak_bytes": -1, "step_s": -1.0}, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
        rows = [None] * world
        dist.all_gather_object(rows, {"rank": rank, **got, "error": error})
        if rank == 0:
            impl, sched, ac, precision, zero, pp_size, dp = spec.split(":")
            errors = [r["error"] for r in rows if r["error"]]
            step_s = max(r["step_s"] for r in rows)
            tokens = args.mb_size * args.microbatches * int(dp) * args.seq
            rec = {"config": spec, "impl": impl, "schedule": sched, "activation_checkpointing": ac,
                   "precision": precision, "zero": int(zero), "pp": int(pp_size), "dp": int(dp),
                   "device": str(device.type), "model": {"layers": args.layers, "d_model": args.d_model,
                                                         "seq": args.seq, "vocab": args.vocab},
                   "mb_size": args.mb_size, "microbatches": args.microbatches,
                   "status": "failed" if errors else "ok", "error": errors[0] if errors else None,
                   "peak_gib_per_rank": [round(r["peak_bytes"] / 2**30, 3) for r in rows],
                   "step_time_s": step_s, "tokens_per_s": tokens / step_s if step_s > 0 else 0.0}
            print(json.dumps(rec), flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
