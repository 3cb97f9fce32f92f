"""One GPU, no pipeline: forward+backward of issue 16's HF Llama (16 layers, hidden 2048, MLP 5632, 16 heads /
8 KV heads, vocab 32000, seq 1024, microbatch 2, bf16, sdpa) eagerly and through pp's traced stages (the
pipe cut in two, both stages in this process). The two alternate in rounds (host-bound timings on a shared
machine drift), and each reports its best and median round; the device time of one pass (the sum of its
kernels, from torch.profiler) is the figure no host noise reaches.

    python scripts/traced_cost.py [--rounds 7] [--out FILE]       (needs transformers)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pp  # noqa: E402


class CausalLM(nn.Module):
    def __init__(self, layers=16, d=2048, ff=5632, heads=16, kv=8, vocab=32000, seq=1024):
        super().__init__()
        import transformers
        cfg = transformers.LlamaConfig(hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                       max_position_embeddings=seq, use_cache=False)
        cfg._attn_implementation = "sdpa"
        self.m = transformers.LlamaForCausalLM(cfg)

    def forward(self, ids):
        return self.m(input_ids=ids).logits


def _loss(logits, tgt):
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())


def _round(fn, n: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def _device_ms(fn) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = CausalLM().to(dev, torch.bfloat16)
    ids = torch.randint(0, 32000, (2, 1024), device=dev)
    tgt = torch.randint(0, 32000, (2, 1024), device=dev)
    t = time.perf_counter()
    pipe = pp.pipeline(model, (ids,), split_spec={"m.model.layers.8": pp.SplitPoint.BEGINNING})
    trace_s = time.perf_counter() - t
    eager = lambda: _loss(model(ids), tgt).backward()           # noqa: E731
    traced = lambda: _loss(pipe(ids)[0], tgt).backward()        # noqa: E731
    for fn in (eager, traced, eager, traced):
        fn()
    e, p = [], []
    for _ in range(a.rounds):
        e.append(_round(eager, a.per_round))
        p.append(_round(traced, a.per_round))
    rec = dict(what="hf-llama fwd+bwd, one GPU", device=torch.cuda.get_device_name(), torch=torch.__version__,
               eager_best_ms=round(min(e) * 1e3, 2), traced_best_ms=round(min(p) * 1e3, 2),
               eager_median_ms=round(statistics.median(e) * 1e3, 2),
               traced_median_ms=round(statistics.median(p) * 1e3, 2),
               ratio_best=round(min(p) / min(e), 3), ratio_median=round(statistics.median(p) / statistics.median(e), 3),
               eager_device_ms=round(_device_ms(eager), 2), traced_device_ms=round(_device_ms(traced), 2),
               trace_s=round(trace_s, 1))
    rec["ratio_device"] = round(rec["traced_device_ms"] / rec["eager_device_ms"], 3)
    print(json.dumps(rec), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
