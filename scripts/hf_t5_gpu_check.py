"""T5 (encoder-decoder, default attention) pipelined over 2 GPUs equals the unsplit model on one GPU.

    torchrun --standalone --nproc-per-node 2 scripts/hf_t5_gpu_check.py [--steps 3]

Both run in float32 with TF32 off, from the same init and batches, under 1F1B and ZBVZeroBubble with
SGD; rank 0 prints each step's mean loss for both and the largest relative difference, and exits 1
when it passes 1e-4.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import pp


class T5LM(nn.Module):
    """T5ForConditionalGeneration mapping (input_ids, decoder_input_ids) to logits."""

    def __init__(self, layers: int):
        super().__init__()
        config = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=layers,
                                       num_heads=8, dropout_rate=0.0, decoder_start_token_id=0, use_cache=False)
        self.t5 = transformers.T5ForConditionalGeneration(config)

    def forward(self, input_ids, decoder_input_ids):
        return self.t5(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def batch(step: int, n: int = 16):
    g = torch.Generator().manual_seed(step)
    return (torch.randint(0, 32128, (n, 128), generator=g), torch.randint(0, 32128, (n, 64), generator=g),
            torch.randint(0, 32128, (n, 64), generator=g))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()   # on CPU (gloo) the same check runs, slowly: a smoke test
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank()
    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    worst = 0.0
    for schedule in ("1F1B", "ZBVZeroBubble"):
        torch.manual_seed(0)
        whole = T5LM(args.layers).to(dev)
        ref = copy.deepcopy(whole)
        src, tgt, _ = batch(0, 16 // args.microbatches)
        par = pp.parallelize(whole, (src.to(dev), tgt.to(dev)), n_microbatches=args.microbatches,
                             loss_fn=loss_fn, pp=2, schedule=schedule, device=dev)
        opt = torch.optim.SGD(list(par.parameters()), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for step in range(args.steps):
            src, tgt, labels = (t.to(dev) for t in batch(step + 1))
            opt.zero_grad()
            losses: list = []
            par.step(src, tgt, target=labels, losses=losses)
            opt.step()
            ref_opt.zero_grad()
            want = []
            for s, t, y in zip(src.chunk(args.microbatches), tgt.chunk(args.microbatches), labels.chunk(args.microbatches)):
                loss = loss_fn(ref(s, t), y) / args.microbatches
                loss.backward()
                want.append(loss.item() * args.microbatches)
            ref_opt.step()
            if par.owns_loss:
                got = [l.item() for l in losses]
                diff = max(abs(a - b) / abs(b) for a, b in zip(got, want))
                worst = max(worst, diff)
                print(f"T5 {schedule} step {step + 1}: pp {sum(got) / len(got):.6f} unsplit "
                      f"{sum(want) / len(want):.6f} max rel diff {diff:.2e}", flush=True)
        del par, opt, whole, ref
        if cuda:
            torch.cuda.empty_cache()
    flag = torch.tensor([worst], device=dev)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    ok = flag.item() < 1e-4
    if rank == 0:
        print(f"T5 on 2 GPUs: {'OK' if ok else 'MISMATCH'} (largest relative loss difference {flag.item():.2e})")
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
