"""One GPU, one rank: where pp.run's step time goes on issue 20's GPT (16 layers, d_model 2048, seq 1024,
vocab 32768, bf16, 16 microbatches of 2), variant against variant in alternating rounds.

    torchrun --nproc-per-node 1 scripts/trainer_cost.py [--rounds 5] [--out FILE]

Variants, each on its own copy of the model (same seed):
  eager       the whole model, gradient accumulation over the 16 microbatches (no pipeline runtime)
  manual      pp's Schedule1F1B over one manual PipelineStage (the GPT module itself), as bench.py runs
  traced      pp's Schedule1F1B over the stage of `pp.pipeline(model, example, dynamic=False)`
  parallelize `pp.parallelize(model, ..., precision="bf16")` and `ParallelModel.step`, what pp.run runs
  recorded   the same with `schedule.record_trace = True` (pp.run's setting: per-action CUDA events,
              a device sync at the start and the end of the step)
  trainer    the same plus what pp.run adds around a step: zero_grad, the per-step statistics gather
              (one device-to-host read), gradient clipping and fused AdamW
  job        the model built as pp.run builds it (config -> `prepare` -> `make_model`: traced from the
              meta device, materialised by `init_fn`, a one-rank mesh), stepped as `parallelize`
  runstep    pp.run's own `Trainer.step` on that config (batches from its data, the statistics gather,
              clipping, fused AdamW, the bubble meter): everything of pp.run's step but the loop around it
Each round times `--per-round` steps of each variant (device synchronised around the round); the record
has each variant's best and median step, and each one's device time for one step (the sum of its kernels,
torch.profiler): a step much longer than its device time is host-bound.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pp  # noqa: E402
from pp.launcher.models import GPT  # noqa: E402
from pp.launcher.rank import lm_loss  # noqa: E402
from pp.schedules.classes import Schedule1F1B  # noqa: E402
from pp.stage.runtime import PipelineStage  # noqa: E402
from traced_cost import _device_ms  # noqa: E402  (scripts/ is on sys.path when this file runs)

M, MB, SEQ, VOCAB = 16, 2, 1024, 32768


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _loss(logits, tgt):
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())


def _model(dev):
    torch.manual_seed(0)
    if dev.type == "cpu":   # --smoke: the same 16 layers at width 16, so a step's time is nearly all host work
        return GPT(VOCAB, 16, 16, 2, SEQ)
    return GPT(VOCAB, 2048, 16, 16, SEQ).to(dev, torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--variants", default="eager,manual,traced,parallelize,recorded,trainer,job,runstep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="on the CPU, 16 layers of width 16, seq 8: the times are then nearly all host work (the "
                         "operators' dispatch, autograd, pp's runtime), a proxy for the host side of a GPU step")
    a = ap.parse_args()
    global SEQ, VOCAB
    if a.smoke:
        SEQ, VOCAB = 8, 64
    dev = torch.device("cpu") if a.smoke else torch.device("cuda", 0)
    dist.init_process_group("gloo" if a.smoke else "nccl")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ids = torch.randint(0, VOCAB, (M * MB, SEQ), device=dev)
    tgt = torch.randint(0, VOCAB, (M * MB, SEQ), device=dev)
    steps = {}
    names = a.variants.split(",")
    if "eager" in names:
        eager = _model(dev)

        def eager_step():
            for x, y in zip(ids.chunk(M), tgt.chunk(M)):
                (_loss(eager(x), y) / M).backward()
            eager.zero_grad(set_to_none=True)
        steps["eager"] = eager_step
    if "manual" in names:
        manual = _model(dev)
        sm = Schedule1F1B(PipelineStage(manual, 0, 1, dev), M, loss_fn=_loss)

        def manual_step():
            sm.step(ids, target=tgt)
            manual.zero_grad(set_to_none=True)
        steps["manual"] = manual_step
    if "traced" in names:
        traced = _model(dev)
        pipe = pp.pipeline(traced, (ids[:MB],), dynamic=False)
        st = Schedule1F1B(pipe.build_stage(0, dev), M, loss_fn=_loss)

        def traced_step():
            st.step(ids, target=tgt)
            traced.zero_grad(set_to_none=True)
        steps["traced"] = traced_step
    for name in ("parallelize", "recorded", "trainer"):
        if name not in names:
            continue
        pm = pp.parallelize(_model(dev), (ids[:MB],), n_microbatches=M, loss_fn=lm_loss, schedule="1F1B",
                            precision="bf16" if dev.type == "cuda" else "fp32", device=dev)
        pm.schedule.record_trace = name != "parallelize"
        if name != "trainer":
            def pm_step(pm=pm):
                pm.step(ids, target=tgt, losses=[])
                pm.zero_grad(set_to_none=True)
            steps[name] = pm_step
            continue
        opt = pm.build_optimizer(torch.optim.AdamW, [{"params": list(pm.parameters())}], lr=1e-4, fused=True)

        def trainer_step(pm=pm, opt=opt):
            opt.zero_grad(set_to_none=True)
            losses: list = []
            pm.step(ids, target=tgt, losses=losses)
            row = torch.zeros(4, device=dev)
            row[0] = pm.grad_norm_sq()
            row[1] = torch.stack([l.detach().float() for l in losses]).sum()
            norm = row.tolist()[0] ** 0.5           # the trainer's one device-to-host read per step
            if norm > 1.0:
                torch._foreach_mul_(pm.grads(), 1.0 / (norm + 1e-6))
            opt.step()
        steps[name] = trainer_step
    if "job" in names or "runstep" in names:
        from pp.launcher.config import load_config
        from pp.launcher.job import prepare
        from pp.launcher.rank import make_model
        from pp.launcher.train import Trainer
        import tempfile
        cfg_path = os.path.join(tempfile.mkdtemp(), "gpt.yaml")
        with open(cfg_path, "w") as f:   # issue 20's model as pp.run gets it (the smoke run: width 16)
            f.write(f"model: {{name: gpt, vocab_size: {VOCAB if not a.smoke else 256}, d_model: "
                    f"{16 if a.smoke else 2048}, n_layers: 16, n_heads: {2 if a.smoke else 16}, seq_len: {SEQ}}}\n"
                    f"parallel: {{pp: 1}}\nschedule: {{name: 1F1B, microbatches: {M}}}\n"
                    f"train: {{steps: 1000, batch_size: {M * MB}, precision: {'fp32' if a.smoke else 'bf16'}}}\n"
                    f"checkpoint: {{every: 0}}\noutput: {{dir: {os.path.dirname(cfg_path)}}}\n")
        if "job" in names:
            jm = make_model(prepare(load_config(cfg_path, []), 1), dev)

            def job_step(pm=jm):
                pm.step(ids, target=tgt, losses=[])
                pm.zero_grad(set_to_none=True)
            steps["job"] = job_step
        if "runstep" in names:
            trainer = Trainer(prepare(load_config(cfg_path, []), 1), 0, dev)
            count = iter(range(1, 10**6))
            steps["runstep"] = lambda: trainer.step(next(count))
    for fn in steps.values():   # warm-up: shapes, kernels, allocator
        for _ in range(2):
            fn()
    _sync()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(a.rounds):
        for n, fn in steps.items():
            _sync()
            t = time.perf_counter()
            for _ in range(a.per_round):
                fn()
            _sync()
            times[n].append((time.perf_counter() - t) / a.per_round)
    rec = {"what": "GPT 16x2048 seq 1024, 16 microbatches of 2, bf16, one GPU: step ms",
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    for n, fn in steps.items():
        rec[n] = {"best_ms": round(min(times[n]) * 1e3, 2), "median_ms": round(statistics.median(times[n]) * 1e3, 2),
                  "device_ms": round(_device_ms(fn), 2) if dev.type == "cuda" else None}
    print(json.dumps(rec), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
