"""A GPT on 4 ranks, pipeline x tensor or pipeline x data parallel:
    torchrun --nproc-per-node 4 examples/pp_tp_dp.py --tp 2     # 2 stages, each over 2 tp ranks
    torchrun --nproc-per-node 4 examples/pp_tp_dp.py --dp 2     # 2 replicas of a 2-stage pipeline
"""
import argparse

import torch
import torch.distributed as dist

import pp
from pp.comms.backend import init_process_group_from_env
from pp.launcher.models import GPT
from pp.launcher.train import lm_loss

parser = argparse.ArgumentParser()
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--dp", type=int, default=1)
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

rank, world, device = init_process_group_from_env()
torch.manual_seed(0)  # every rank builds the same model and draws the same batch
model = GPT(vocab_size=256, d_model=64, n_layers=4, n_heads=4, seq_len=32)
batch, micro = 16, 4
tokens = torch.randint(0, 256, (batch, 33))
x, y = tokens[:, :-1], tokens[:, 1:]

par = pp.parallelize(model, (x[: batch // args.dp // micro],), n_microbatches=micro, loss_fn=lm_loss,
                     tp=args.tp, dp=args.dp, tp_plan=model.tp_plan())  # pp = world / (tp * dp)
optimizer = torch.optim.AdamW(par.parameters(), lr=3e-3)

for step in range(args.steps):
    optimizer.zero_grad()
    losses = []
    par.step(par.local_share(x), target=par.local_share(y), losses=losses)  # this replica's share
    par.clip_grad_norm_(1.0)                                                 # global norm, all ranks
    optimizer.step()
    if par.owns_loss and par.dp_rank == 0:
        print(f"step {step} loss {torch.stack(losses).mean().item():.4f} (replica 0)")
dist.destroy_process_group()
