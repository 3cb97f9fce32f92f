"""Peak memory and time of a last stage's loss: the LM head (bf16 matmul) and cross-entropy in float32,
plain (`F.cross_entropy(logits.float(), ...)`) against `pp.losses.chunked_cross_entropy`, forward and
backward, on one GPU.

    python scripts/loss_memory.py [--rows 32768] [--d-model 4096] [--vocab 32000] [--out FILE.jsonl]

Rows are microbatch x sequence (8 x 4096 by default). Reports the peak allocated above what the inputs
and the head's weight take, in GiB, and the median of 5 timed runs in ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pp.losses import chunked_cross_entropy


def plain(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def run(loss_fn, h, w, targets) -> tuple[float, float]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(7):
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = h @ w.t()
        loss = loss_fn(logits, targets)
        loss.backward()
        del logits, loss
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
        h.grad = w.grad = None
    return (torch.cuda.max_memory_allocated() - base) / 2**30, statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8 * 4096)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    h = torch.randn(a.rows, a.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(a.vocab, a.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, a.vocab, (a.rows,), device=dev)
    for name, fn in (("plain", plain), ("chunked", chunked_cross_entropy)):
        gib, ms = run(fn, h, w, targets)
        rec = {"loss": name, "rows": a.rows, "d_model": a.d_model, "vocab": a.vocab, "peak_gib": round(gib, 2),
               "ms": round(ms, 2), "logits_gib_bf16": round(a.rows * a.vocab * 2 / 2**30, 2),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        print(json.dumps(rec), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
