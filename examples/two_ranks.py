"""Train a small model on 2 pipeline ranks: torchrun --nproc-per-node 2 examples/two_ranks.py"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.comms.backend import init_process_group_from_env

rank, world, device = init_process_group_from_env()
torch.manual_seed(0)  # every rank builds the same model and cuts it the same way
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
x, y = torch.randn(32, 16), torch.randn(32, 4)

pipe = pp.pipeline(model, (x[:8],), split_policy=pp.split_into_equal_size(world))
stage = pipe.build_stage(rank, device)                   # this rank's part, original parameter names
schedule = pp.Schedule1F1B(stage, n_microbatches=4, loss_fn=F.mse_loss)
optimizer = torch.optim.AdamW(stage.submod.parameters(), lr=1e-2)

for step in range(20):
    optimizer.zero_grad()
    losses = []
    schedule.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None, losses=losses)
    optimizer.step()
    if losses:
        print(f"step {step} loss {torch.stack(losses).mean().item():.4f}")
torch.distributed.destroy_process_group()
