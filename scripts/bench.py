"""Pipeline benchmark: pp against torch.distributed.pipelining on a GPT-like model, same stages, same inputs.

Run under torchrun, one process per pipeline rank:

    torchrun --nproc-per-node 4 scripts/bench.py --impl pp --schedule 1F1B --microbatches 16
    torchrun --nproc-per-node 4 scripts/bench.py --suite issue6 --out bench/results/run.jsonl
    torchrun --nproc-per-node 8 scripts/bench.py --impl pp --schedule 1F1B --microbatches 32 --dp 2   # PP=4 x DP=2

Rank 0 prints one JSON line per configuration and appends it to `--out`. With `--suite` several
configurations run one after the other inside one process group (torch import and NCCL set-up are paid
once). The stages are cut by hand (manual `PipelineStage`), so both runtimes get the very same modules:

* stage 0 = token + position embedding and its blocks; the last stage = its blocks, final norm, LM head;
* `--split even`: blocks spread evenly (the remainder goes to the earliest stages);
* `--split cost`: `pp.split_by_cost` balancing over the segments [embedding, block 0..L-1, head] with the
  estimated forward cost per token: embedding 0, block 24·d² + 4·S·d, head 2·d·V (backward is ~2x the
  forward everywhere, so it does not change the balance). The same cut is used for `--impl torch`;
* `--split measured`: the same balancing on measured fwd+bwd seconds of the embedding, one block and the
  head with its loss (one microbatch, timed on every rank and averaged, so every rank cuts alike).
  Cuts balance stages, not ranks (a V schedule's rank holds two stages).

Measured per configuration:
* step time: `--warmup` untimed steps, then `--steps` steps, each started after a barrier and timed with
  device syncs around it; a step's time is the slowest rank's; tokens/s = batch tokens / mean step time;
* ideal: before the pipeline runs, each rank times fwd+bwd of each of its stages on one microbatch alone
  (no communication; mean of 5 after 2 warm-ups); ideal step = n_microbatches × max over ranks of the sum
  over its stages; efficiency = ideal / measured; balanced_efficiency uses
  n_microbatches × (sum over all stages) / ranks instead (a perfectly balanced cut);
* peak memory per rank (`torch.cuda.max_memory_allocated`, reset after the warm-up), loss of the last step.

Data parallelism, `--dp N`: world = PP x N ranks in the (pp, dp) layout of `pp.parallel.make_mesh` (global
rank = pp_rank x N + dp_rank). Each replica runs the pipeline (`--microbatches` microbatches of `--mb-size`)
on its own pp group and its own slice of one global batch (N x the batch of a dp=1 run; the same data as a
dp=1 run with N x the microbatches). Gradients are averaged over the dp group with `pp.parallel.GradSync`
once per step: for `--impl pp` each stage's all-reduce starts from the executor's `on_backward_done` hook
right after its last backward (as `pp.parallelize` does), overlapped with the rest; torch's schedules have no
such hook, so for `--impl torch` all of them start after its step (record `dp_sync`: overlapped/after_step).
The wait for them is inside the timed step. tokens/s counts every replica's tokens; the ideal and the
efficiencies are per pipeline (a replica's ideal is the pp-only one); the loss is the mean over replicas.
Each record carries `grad_norm_per_stage` (replica 0, last timed step) and `dp_grad_rel_diff` (largest
relative difference of any replica's stage gradient norm from replica 0's: 0 when the sync works).

`--trace DIR` (pp only) records one extra step with `record_trace`, and rank 0 merges every rank's events into
`DIR/<label>.json` (draw it with `python -m pp.schedules.show <label> --trace DIR/<label>.json -o x.png`).
`--profile DIR` writes a torch.profiler trace of one extra step per rank.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pp  # noqa: E402
from pp.comms.backend import init_process_group_from_env  # noqa: E402
from pp.parallel import GradSync, make_mesh  # noqa: E402
from pp.schedules.registry import SCHEDULES, get_spec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import (block_ranges, build_stage_module, hf_llama_pipe, hf_llama_sizes, loss_fn,  # noqa: E402
                         time_alone_pipe)
from bench_suites import configs_of  # noqa: E402

# --------------------------------------------------------------------------------------------- model


_MEASURED: dict[tuple, dict[str, float]] = {}
_FIRST_RUN = True


def measured_costs(cfg) -> dict[str, float]:
    """Seconds of fwd+bwd of the embedding, one block and the head (with the loss) on one microbatch, timed
    on every rank and averaged over ranks, so that every rank computes the same cut. Cached per model."""
    key = (cfg.layers, cfg.d_model, cfg.heads, cfg.vocab, cfg.seq, cfg.mb_size, cfg.dtype, cfg.seed)
    if key in _MEASURED:
        return dict(_MEASURED[key])
    device, dtype = cfg._device, cfg._dtype
    one = argparse.Namespace(**{**vars(cfg), "layers": 1})
    ranges = [(0, 0), (0, 1), (1, 1)]         # embed | one block | head
    mods = {s: build_stage_module(s, ranges, one, device, dtype) for s in range(3)}
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(cfg.vocab, (cfg.mb_size, cfg.seq), generator=g).to(device)
    t = time_alone(mods, 3, one, device, dtype, tokens, tokens, warmup=2, repeats=5)
    world = dist.get_world_size()
    t = [x / world for x in all_reduce([t[0], t[1], t[2]], dist.ReduceOp.SUM, device)]
    del mods
    costs = {"embed": t[0], **{f"blocks.{i}": t[1] for i in range(cfg.layers)}, "head": t[2]}
    _MEASURED[key] = costs
    return dict(costs)


# ------------------------------------------------------------------------------------------- helpers


def log(rank: int, *msg) -> None:
    if rank == 0:
        print(f"[bench {time.strftime('%H:%M:%S')}]", *msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce(values: list[float], op, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def barrier(device: torch.device) -> None:
    """All ranks here, device idle: a tiny all-reduce on the device, then a sync."""
    sync(device)
    all_reduce([0.0], dist.ReduceOp.SUM, device)
    sync(device)


def gather_objects(obj, world: int):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


_GROUPS: dict[tuple[int, int], tuple] = {}


def dp_groups(pp_size: int, dp: int) -> tuple:
    """(pp group, dp group) of this rank: the default group and None when dp == 1, else the groups of
    `pp.parallel.make_mesh(pp_size, dp)` (made once per shape: creating groups is collective)."""
    if dp == 1:
        return None, None
    if (pp_size, dp) not in _GROUPS:
        mesh = make_mesh(pp_size, dp)
        _GROUPS[(pp_size, dp)] = (mesh.get_group("pp"), mesh.get_group("dp"))
    return _GROUPS[(pp_size, dp)]


def grad_norm(module: nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def torch_pipelining():
    try:
        import torch.distributed.pipelining as tpp
        return tpp
    except Exception:  # noqa: BLE001 - any import failure means "unavailable"
        return None


def schedule_classes(impl: str, name: str):
    """(PipelineStage class, schedule class) or None if this torch lacks them."""
    if impl == "pp":
        return pp.PipelineStage, getattr(pp, f"Schedule{name}")
    tpp = torch_pipelining()
    if tpp is None:
        return None
    cls = getattr(tpp, f"Schedule{name}", None)
    return (tpp.PipelineStage, cls) if cls is not None else None


def label_of(cfg) -> str:
    lab = f"{cfg.schedule}_mb{cfg.microbatches}"
    if cfg.split != "even":
        lab += f"_{cfg.split}"
    if cfg.tag:
        lab += f"_{cfg.tag}"
    if getattr(cfg, "compile", False):
        lab += "_compiled" + _per_suffix(cfg, "_")
    if getattr(cfg, "cuda_graphs", False):
        lab += "_graphs"
    if getattr(cfg, "dp", 1) > 1:
        lab += f"_dp{cfg.dp}"
    if getattr(cfg, "stages_per_rank", None):
        lab += f"_v{cfg.stages_per_rank}"
    return lab


def _per_suffix(cfg, sep: str) -> str:
    """'' for --compile-per module (torch.compile of each stage module, the older records), else
    e.g. '-block' (pp's compiled stages, schedule.compile(per=...))."""
    per = getattr(cfg, "compile_per", "module") or "module"
    return "" if per == "module" else f"{sep}{per}"


def model_tag(cfg) -> str:
    """'' for the GPT, else e.g. '-hf-llama-f5632kv8' (MLP width, KV heads)."""
    if getattr(cfg, "model", "gpt") == "gpt":
        return ""
    d_ff, kv = hf_llama_sizes(cfg)
    return f"-{cfg.model}-f{d_ff}kv{kv}"


def config_key(cfg) -> str:
    return "/".join([cfg.impl, cfg.schedule, str(cfg.microbatches), cfg.split, cfg.tag or "-",
                     f"L{cfg.layers}d{cfg.d_model}h{cfg.heads}V{cfg.vocab}S{cfg.seq}b{cfg.mb_size}" + model_tag(cfg)
                     + ("-compiled" + _per_suffix(cfg, "-") if getattr(cfg, "compile", False) else "")
                     + ("-graphs" if getattr(cfg, "cuda_graphs", False) else "")
                     + (f"-dp{cfg.dp}" if getattr(cfg, "dp", 1) > 1 else "")
                     + (f"-v{cfg.stages_per_rank}" if getattr(cfg, "stages_per_rank", None) else "")])


# ------------------------------------------------------------------------------------- measurements


def time_alone(modules: dict[int, nn.Module], n_stages: int, cfg, device, dtype, tokens, targets,
               warmup: int = 2, repeats: int = 5) -> dict[int, float]:
    """Seconds of fwd+bwd of each local stage on one microbatch, run alone (no communication)."""
    mb = cfg.mb_size
    times = {}
    for s, mod in modules.items():
        if s == 0:
            x = tokens[:mb]
        else:
            x = torch.randn(mb, cfg.seq, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
        grad = None
        last = s == n_stages - 1

        def once():
            out = mod(x)
            if last:
                loss_fn(out, targets[:mb]).backward()
            else:
                out.backward(grad if grad is not None else torch.ones_like(out))

        if not last:
            with torch.no_grad():
                grad = torch.randn_like(mod(x))
        for _ in range(warmup):
            once()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        sync(device)
        times[s] = (time.perf_counter() - t0) / repeats
        mod.zero_grad(set_to_none=True)
    return times


def run_config(cfg, rank: int, world: int, device: torch.device) -> dict | None:
    """One configuration on every rank; returns the result record on rank 0."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    if device.type == "cpu":
        dtype = torch.float32
    spec = get_spec(cfg.schedule)
    cfg.schedule = spec.name
    cfg._device, cfg._dtype = device, dtype
    dp = cfg.dp
    try:  # a bad shape for this schedule fails alike on every rank, before any communication
        if world % dp:
            raise ValueError(f"--dp {dp} does not divide the world size {world}")
        pp_size = world // dp
        n_stages = spec.n_stages(pp_size, getattr(cfg, "stages_per_rank", None))
        placement = spec.placement(n_stages, pp_size)
        hf = cfg.model != "gpt"
        if hf and cfg.split not in ("even", "cost"):
            raise ValueError(f"--split {cfg.split} is for the gpt model; --model {cfg.model} takes even or cost")
        ranges = block_ranges(cfg, n_stages, cfg.split) if cfg.split != "measured" and not hf else None
    except ValueError as e:
        log(rank, f"{config_key(cfg)}: {e}")
        return {"impl": cfg.impl, "schedule": spec.name, "microbatches": cfg.microbatches, "ranks": world,
                "dp": dp, "split": cfg.split, "tag": cfg.tag or None, "config": config_key(cfg),
                "status": "error", "error": str(e)} if rank == 0 else None
    if ranges is None and not hf:
        ranges = block_ranges(cfg, n_stages, cfg.split, measured_costs)  # measures (collectives): all ranks get here
    if hf and cfg.impl == "torch":
        return {"impl": cfg.impl, "schedule": spec.name, "config": config_key(cfg), "model": {"name": cfg.model},
                "status": "unavailable", "error": "torch.distributed.pipelining cannot split this model (its "
                "pipeline() fails on the traced Llama: 'unexpected placeholder node'); use pp"} if rank == 0 else None
    # (pp, dp) layout of pp.parallel.make_mesh (tp=1): global rank = pp_rank * dp + dp_rank.
    pp_rank, dp_rank = divmod(rank, dp)
    pp_group, dp_group = dp_groups(pp_size, dp)
    mine = [s for s, r in enumerate(placement) if r == pp_rank]
    record = {
        "impl": cfg.impl, "schedule": spec.name, "microbatches": cfg.microbatches, "ranks": world,
        "pp": pp_size, "dp": dp, "stages": n_stages, "split": cfg.split, "tag": cfg.tag or None, "config": config_key(cfg),
        "model": {"name": cfg.model, "layers": cfg.layers, "d_model": cfg.d_model, "heads": cfg.heads,
                  "vocab": cfg.vocab, "seq": cfg.seq, "mb_size": cfg.mb_size, "dtype": str(dtype).replace("torch.", ""),
                  **(dict(zip(("d_ff", "kv_heads"), hf_llama_sizes(cfg))) if hf else {})},
        "warmup": cfg.warmup, "steps": cfg.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    classes = schedule_classes(cfg.impl, spec.name)
    if classes is None:
        record.update(status="unavailable", error=f"torch {torch.__version__} has no Schedule{spec.name}")
        return record if rank == 0 else None
    stage_cls, sched_cls = classes

    # Same global batch on every rank (only the first/last stage use it), same on both impls; each dp
    # replica takes its own slice of it (dp=1: the whole). The global batch of dp replicas with M
    # microbatches each is the batch of a dp=1 run with dp*M microbatches.
    g = torch.Generator().manual_seed(cfg.seed)
    batch = cfg.mb_size * cfg.microbatches
    tokens = torch.randint(cfg.vocab, (dp * batch, cfg.seq), generator=g)
    targets = torch.randint(cfg.vocab, (dp * batch, cfg.seq), generator=g)
    tokens = tokens[dp_rank * batch:(dp_rank + 1) * batch].to(device)
    targets = targets[dp_rank * batch:(dp_rank + 1) * batch].to(device)

    pipe = None
    if hf:  # the whole model traced by pp.pipeline on every rank; this rank keeps its stages after timing
        pipe, ranges = hf_llama_pipe(cfg, n_stages, device, dtype, tokens[:cfg.mb_size])
        modules = {s: pipe.get_stage_module(s) for s in mine}
    else:
        modules = {s: build_stage_module(s, ranges, cfg, device, dtype) for s in mine}
    record["blocks_per_stage"] = [hi - lo for lo, hi in ranges]
    n_params = sum(p.numel() for m in modules.values() for p in m.parameters())
    per = getattr(cfg, "compile_per", "module") or "module"
    counters = {}
    if cfg.compile and per != "module":   # pp's compiled stages (schedule.compile), in place
        if cfg.impl != "pp":
            raise ValueError(f"--compile-per {per} is pp's schedule.compile; torch takes --compile-per module")
        from pp.stage.compiled import CompileCounter, compile_stage
        for s, m in modules.items():
            counters[s] = CompileCounter("inductor", None, None, keep_graph=spec.split_backward)
            compile_stage(m, counters[s], per)
    elif cfg.compile:  # compiled on first use, in time_alone's warm-up: the ideal is the compiled stages' too
        modules = {s: torch.compile(m) for s, m in modules.items()}
    record["compile"] = bool(cfg.compile)
    record["compile_per"] = per if cfg.compile else None

    # Ideal: each rank's stages alone, before any pipeline traffic.
    if hf:
        alone = time_alone_pipe(pipe, mine, tokens[:cfg.mb_size], targets[:cfg.mb_size], lambda: sync(device))
        pipe_info = pipe.info()
        del pipe   # the other stages' weights go with it
    else:
        alone = time_alone(modules, n_stages, cfg, device, dtype, tokens, targets)
    per_stage = [0.0] * n_stages
    for s, t in alone.items():
        per_stage[s] = t
    per_stage = [t / dp for t in all_reduce(per_stage, dist.ReduceOp.SUM, device)]  # mean over replicas
    per_rank = [sum(per_stage[s] for s in range(n_stages) if placement[s] == r) for r in range(pp_size)]
    ideal = cfg.microbatches * max(per_rank)           # per pipeline: a replica's ideal is pp-only's
    balanced = cfg.microbatches * sum(per_stage) / pp_size
    total_params = int(all_reduce([float(n_params)], dist.ReduceOp.SUM, device)[0]) // dp

    # Build the schedule; construction errors are the same on every rank, but agree on them anyway.
    error = None
    sched = grad_sync = None
    try:
        if hf:   # stages that know the pipe's wiring (values skipping a stage, several inputs)
            from pp.stage.runtime import build_stage
            stages = [build_stage(modules[s], s, pipe_info, device, group=pp_group) for s in mine]
        else:
            stages = [stage_cls(modules[s], s, n_stages, device, group=pp_group) for s in mine]
        sched = sched_cls(stages[0] if n_stages == pp_size and spec.stages_per_rank == 1 else stages,
                          cfg.microbatches, loss_fn=loss_fn)
        if getattr(cfg, "cuda_graphs", False):
            if cfg.impl != "pp":
                raise ValueError("torch.distributed.pipelining has no CUDA-graph replay of stages")
            sched.enable_cuda_graphs()   # captured after the first warm-up step
        if dp > 1:
            # pp: each stage's all-reduce starts right after its last backward of the step (the executor's
            # hook, as pp.parallelize does); torch's schedules have no such hook: all after the step.
            grad_sync = GradSync({s: list(modules[s].named_parameters()) for s in mine}, dp_group)
            if cfg.impl == "pp":
                sched.on_backward_done = grad_sync.stage_done
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    errors = gather_objects(error, world)
    if any(errors):
        msg = next(e for e in errors if e)
        log(rank, f"{config_key(cfg)}: schedule construction failed: {msg}")
        sched = modules = None  # free them before returning
        record.update(status="error", error=msg[:500])
        return record if rank == 0 else None

    first, last = 0 in mine, (n_stages - 1) in mine
    args = (tokens,) if first else ()
    tgt = targets if last else None

    def step():
        losses: list = []
        sched.step(*args, target=tgt, losses=losses)
        if grad_sync is not None:
            grad_sync.finish()  # waits for the dp all-reduces: part of the step's time
        return losses

    def zero_grads():  # between steps, outside the timed region
        for m in modules.values():
            m.zero_grad(set_to_none=True)

    die = os.environ.get("PP_BENCH_DIE_ON")  # test hook: rank 1 dies in this configuration (resume tests)
    if die and die in config_key(cfg) and rank == min(1, world - 1):
        os._exit(7)
    global _FIRST_RUN
    extra, _FIRST_RUN = (3 if _FIRST_RUN else 0), False  # the process's first config also warms CUDA/NCCL/cuBLAS
    for _ in range(cfg.warmup + extra):
        step()
        zero_grads()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    losses = []
    norms = {}
    for i in range(cfg.steps):
        barrier(device)
        t0 = time.perf_counter()
        losses = step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if i == cfg.steps - 1:  # untimed: the last step's gradient norm per stage (after the dp average)
            norms = {s: grad_norm(m) for s, m in modules.items()}
        zero_grads()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_times = all_reduce(times, dist.ReduceOp.MAX, device)  # a step lasts as long as its slowest rank
    loss = float(torch.stack([x.detach().float() for x in losses]).mean()) if losses else 0.0
    loss = all_reduce([loss if last else 0.0], dist.ReduceOp.SUM, device)[0] / dp  # mean over replicas
    peaks = gather_objects(peak, world)
    every_norm = gather_objects((dp_rank, norms), world)
    grad_norms = [0.0] * n_stages       # replica 0's; the largest relative difference of any other replica's
    for d, ns in every_norm:
        for s, v in ns.items():
            if d == 0:
                grad_norms[s] = v
    spread = max((abs(v - grad_norms[s]) / max(abs(grad_norms[s]), 1e-30)
                  for d, ns in every_norm if d for s, v in ns.items()), default=0.0)

    if cfg.trace and cfg.impl == "pp":
        write_trace(sched, step, cfg, rank, world, device, dp)
        zero_grads()
    if cfg.profile:
        write_profile(step, cfg, rank, device)
        zero_grads()

    mean = sum(step_times) / len(step_times)
    tokens_per_step = dp * batch * cfg.seq  # all replicas' tokens
    record.update(
        status="ok",
        tokens_per_s=tokens_per_step / mean,
        step_time_s=mean,
        step_time_min_s=min(step_times),
        step_time_max_s=max(step_times),
        ideal_step_time_s=ideal,
        balanced_step_time_s=balanced,
        efficiency=ideal / mean,
        balanced_efficiency=balanced / mean,
        stage_fwd_bwd_ms=[round(t * 1e3, 4) for t in per_stage],
        peak_mem_gib=[None if p is None else round(p, 3) for p in peaks],
        loss=loss,
        params=total_params,
        tokens_per_step=tokens_per_step,
        grad_norm_per_stage=grad_norms,
        dp_grad_rel_diff=spread if dp > 1 else None,
        dp_sync=None if dp == 1 else ("overlapped" if cfg.impl == "pp" else "after_step"),
        compiles=None if not counters else sum(c.count for c in counters.values()),   # this rank's graphs
        cuda_graphs=None if not getattr(cfg, "cuda_graphs", False) else {
            s: n for s, n in sched.cuda_graph_replays.items()},   # microbatches this rank replayed, per stage
    )
    del sched, stages, modules
    return record if rank == 0 else None


def write_trace(sched, step, cfg, rank: int, world: int, device, dp: int = 1) -> None:
    """One extra recorded step; rank 0 writes every rank's events into one Chrome trace (with dp > 1, the
    pipeline of replica 0 only, pid = pipeline rank)."""
    barrier(device)
    host_start_us = time.perf_counter() * 1e6
    sched.record_trace = True
    try:
        step()
    finally:
        sched.record_trace = False
    sync(device)
    events = sched.trace_events()
    if device.type == "cuda" and events:
        # On CUDA the executor's timestamps are relative to its first event, placed at an arbitrary host
        # time per rank; put each rank's first event at the host time this step started (after a barrier,
        # with an idle device: the first event runs as soon as it is enqueued) so that ranks line up.
        shift = host_start_us - min(e["ts"] for e in events)
        for e in events:
            e["ts"] += shift
    if rank % dp:
        events = []
    for e in events:
        e["pid"] = rank // dp
    everything = gather_objects(events, world)
    if rank == 0:
        merged = [e for evs in everything for e in evs]
        meta = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}}
                for r in range(world // dp)]
        out = Path(cfg.trace) / f"{label_of(cfg)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"traceEvents": meta + merged}))
        log(rank, f"trace: {out}")


def write_profile(step, cfg, rank: int, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    barrier(device)
    with profile(activities=acts) as prof:
        step()
        sync(device)
    out = Path(cfg.profile)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"{label_of(cfg)}_{cfg.impl}_rank{rank}.json"))


# ------------------------------------------------------------------------------------------- suites

# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("pp", "torch"), default="pp")
    p.add_argument("--schedule", default="1F1B", help=f"one of {', '.join(SCHEDULES)}")
    p.add_argument("--microbatches", type=int, default=16)
    p.add_argument("--split", choices=("even", "cost", "measured"), default="even")
    p.add_argument("--stages-per-rank", type=int, default=None,
                   help="stages per rank for the looped schedules (Interleaved1F1B, LoopedBFS, "
                        "InterleavedZeroBubble); default: what the schedule needs (1, or 2)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas: world = PP x DP, ranks laid out as pp.parallel.make_mesh "
                        "(rank = pp_rank*DP + dp_rank); each replica gets its own slice of data and gradients "
                        "are averaged over the dp group every step (pp: overlapped with the last backwards)")
    p.add_argument("--model", choices=("gpt", "hf-llama"), default="gpt",
                   help="gpt: the stage modules below, cut by hand; hf-llama: transformers' LlamaForCausalLM "
                        "(issue 16: --d-model 2048 --d-ff 5632 --heads 16 --kv-heads 8, vocab 32000), traced and "
                        "cut by pp.pipeline (pp only)")
    p.add_argument("--d-ff", type=int, default=0, help="hf-llama MLP width; 0: 11/4 x d_model rounded up to 256")
    p.add_argument("--kv-heads", type=int, default=0, help="hf-llama key/value heads; 0: half of --heads")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=None, help="default 32768 (gpt), 32000 (hf-llama)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mb-size", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="fp32 on CPU whatever this says")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tag", default="", help="free label stored in the record")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each stage module (both impls alike; recorded as compile=true)")
    p.add_argument("--compile-per", choices=("module", "block", "stage"), default="module",
                   help="with --compile: 'module' torch.compile's each stage module (both impls); 'block' or "
                        "'stage' is pp's schedule.compile(per=...) (pp only; works with every schedule)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="pp only: replay the stages as CUDA graphs (captured after the first warm-up step)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file (default bench/results/bench.jsonl)")
    p.add_argument("--trace", default=None, metavar="DIR", help="pp only: one recorded step, merged Chrome trace")
    p.add_argument("--profile", default=None, metavar="DIR", help="torch.profiler trace of one step per rank")
    p.add_argument("--suite", default=None,
                   help="run several configurations in one process group: 'issue6', 'overhead', 'all', a JSON file "
                        "(list of flag overrides, e.g. {\"impl\": \"pp\", \"schedule\": \"1F1B\", \"dp\": 2}), "
                        "or 'impl:schedule[:microbatches[:split[:dpN]]],...' (e.g. pp:1F1B:32::dp2)")
    p.add_argument("--resume", action="store_true",
                   help="with --suite: skip configurations already in --out; one started but never finished "
                        "(the job died) is recorded as crashed and skipped")
    p.add_argument("--timeout-s", type=float, default=180.0, help="process-group timeout (a hung rank fails the job)")
    args = p.parse_args(argv)
    if args.vocab is None:
        args.vocab = 32000 if args.model == "hf-llama" else 32768
    for name in ("microbatches", "layers", "d_model", "heads", "vocab", "seq", "mb_size", "steps", "dp"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    try:
        args.schedule = get_spec(args.schedule).name
    except ValueError as e:
        p.error(str(e))
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / "bench.jsonl")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_process_group_from_env(timeout_s=args.timeout_s)
    torch.backends.cuda.matmul.allow_tf32 = True
    configs = configs_of(args)
    out = Path(args.out)
    started = Path(str(out) + ".started")
    done: set[str] = set()
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.resume:
            if out.exists():
                done = {json.loads(line).get("config") for line in out.read_text().splitlines() if line.strip()}
            crashed = [k for k in (started.read_text().split("\n") if started.exists() else []) if k and k not in done]
            for key in crashed:
                rec = {"config": key, "status": "crashed", "error": "the job died while running this configuration",
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                rec.update(zip(("impl", "schedule", "microbatches", "split", "tag"), key.split("/")[:5]))
                rec["microbatches"] = int(rec["microbatches"])
                rec["tag"] = None if rec["tag"] == "-" else rec["tag"]
                tail = key.rpartition("-dp")[2]
                rec["dp"] = int(tail) if "-dp" in key and tail.isdigit() else 1
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
                done.add(key)
    done = set(gather_objects(sorted(done), world)[0])
    failed = 0
    for i, cfg in enumerate(configs):
        key = config_key(cfg)
        if key in done:
            continue
        log(rank, f"({i + 1}/{len(configs)}) {key}")
        if rank == 0 and args.suite:
            with started.open("a") as f:
                f.write(key + "\n")
        t0 = time.perf_counter()
        record = run_config(cfg, rank, world, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            record["wall_s"] = round(time.perf_counter() - t0, 2)
            failed += record.get("status") == "error"
            line = json.dumps(record)
            print(line, flush=True)
            with out.open("a") as f:
                f.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed and not args.suite else 0


if __name__ == "__main__":
    sys.exit(main())
