"""On one GPU (NCCL, world 1, two stages on the rank): a GPT-2 with dropout traced in train mode, switched
to eval mode, evaluates as the unsplit model in eval mode on CUDA (the eval graph traced again from the
model, its baked-in devices retargeted to the stage's); and a transposed stage output gets its gradient right.
    torchrun --nproc-per-node 1 scripts/gpu_mode_check.py"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import pp
from pp.comms.backend import init_process_group_from_env

init_process_group_from_env()
dev = torch.device("cuda", 0)
torch.manual_seed(0)
cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False)
lm = transformers.GPT2LMHeadModel(cfg).to(dev)
ids = torch.randint(0, 64, (4, 8), device=dev)
tgt = torch.randint(0, 64, (4, 8), device=dev)


def loss(out, t):
    return F.cross_entropy(out.logits.flatten(0, 1), t.flatten())


pipe = pp.pipeline(lm, (), {"input_ids": ids[:2]}, split_spec={"transformer.h.1": pp.SplitPoint.BEGINNING})
stages = [pipe.build_stage(s, dev) for s in range(2)]
sched = pp.ScheduleInterleaved1F1B(stages, 2, loss_fn=loss)
sched.step(input_ids=ids, target=tgt)
for st in stages:
    st.submod.eval()
losses = []
sched.eval(input_ids=ids, target=tgt, losses=losses)
lm.eval()
with torch.no_grad():
    want = torch.stack([loss(lm(input_ids=a), b) for a, b in zip(ids.chunk(2), tgt.chunk(2))])
print("eval losses pp", [round(x.item(), 6) for x in losses], "unsplit", [round(x, 6) for x in want.tolist()])
torch.testing.assert_close(torch.stack(losses), want)


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_strided_outputs import Transposed  # noqa: E402 - the model of the CPU regression test

model = Transposed().to(dev)
x, y = torch.randn(4, 5, 8, device=dev), torch.randn(4, 5, 3, device=dev)
want_grads = torch.autograd.grad(sum(F.mse_loss(model(a), b) for a, b in zip(x.chunk(2), y.chunk(2))) / 2,
                                 list(model.parameters()))
pipe = pp.pipeline(model, (x[:2],), split_spec={"layers.2": pp.SplitPoint.BEGINNING})
stages = [pipe.build_stage(s, dev) for s in range(2)]
pp.ScheduleInterleaved1F1B(stages, 2, loss_fn=F.mse_loss).step(x, target=y)
got = {n: p.grad for st in stages for n, p in st.submod.named_parameters()}
for (n, _), g in zip(model.named_parameters(), want_grads):
    torch.testing.assert_close(got[n], g)
print("transposed outputs on cuda: gradients equal the unsplit model")
print("gpu mode check: ok")
