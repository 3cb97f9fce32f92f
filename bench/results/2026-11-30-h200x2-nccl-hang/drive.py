"""Run the HF llama bench's model through pp on 2 ranks (nccl on GPU, gloo on CPU), logging every p2p post."""
import argparse, os, sys, time, json, faulthandler
import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F, transformers
import pp
from pp.comms import p2p
from pp.schedules import executor as ex

LOG = os.environ.get("P2PLOG") == "1"
rank = int(os.environ["RANK"])
def log(*a):
    if LOG:
        print(f"[r{rank} {time.monotonic():.3f}]", *a, file=sys.stderr, flush=True)
def d(t): return f"{tuple(t.shape)}:{str(t.dtype)[6:]}:{t.device.type}"
_post = p2p.post
def post(sends, recvs, group, label=""):
    log("POST", "S[" + ",".join(d(t) for t, _ in sends) + "]", "R[" + ",".join(d(t) for t, _ in recvs) + "]")
    return _post(sends, recvs, group, label)
p2p.post = post
_so, _ro = p2p.send_object, p2p.recv_object
def so(obj, peer, group):
    log("SENDOBJ", obj); _so(obj, peer, group); log("SENDOBJ done")
def ro(peer, group):
    log("RECVOBJ ..."); o = _ro(peer, group); log("RECVOBJ", o); return o
p2p.send_object, p2p.recv_object = so, ro
_comp = ex.Executor._compute
def comp(self, action, events):
    log("COMPUTE", action); _comp(self, action, events); log("DONE", action)
ex.Executor._compute = comp

class CausalLM(nn.Module):
    def __init__(self, a):
        super().__init__()
        cfg = transformers.LlamaConfig(hidden_size=a.d_model, intermediate_size=a.d_ff, num_hidden_layers=a.layers,
                                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                                       vocab_size=a.vocab, max_position_embeddings=a.seq, use_cache=False)
        cfg._attn_implementation = a.attn
        self.m = transformers.LlamaForCausalLM(cfg)
    def forward(self, ids):
        return self.m(input_ids=ids).logits

def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1))

def main():
    if os.environ.get("DUMP_AFTER_S"):
        faulthandler.dump_traceback_later(float(os.environ["DUMP_AFTER_S"]), exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", default="1F1B")
    for k, v in dict(layers=4, d_model=256, d_ff=512, heads=4, kv_heads=2, vocab=1024, seq=1024, mbs=2, n_mb=4, steps=2).items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--fp32", action="store_true")
    a = ap.parse_args()
    dtype = torch.float32 if a.fp32 else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.mbs * a.n_mb, a.seq), generator=g)
    tgt = torch.randint(0, a.vocab, (a.mbs * a.n_mb, a.seq), generator=g)
    p = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu"); dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = CausalLM(a).to(dev, dtype)
    ref = None
    if rank == 1:
        with torch.no_grad():
            ref = [float(loss_fn(model(x.to(dev)), y.to(dev))) for x, y in zip(ids.chunk(a.n_mb), tgt.chunk(a.n_mb))]
    spec = {f"m.model.layers.{a.layers // 2}": pp.SplitPoint.BEGINNING}
    pipe = pp.pipeline(model, (ids[: a.mbs].to(dev),), split_spec=spec)
    stage = pipe.build_stage(rank, dev)
    del model
    sched = getattr(pp, "Schedule" + a.schedule)(stage, n_microbatches=a.n_mb, loss_fn=loss_fn)
    ids, tgt = ids.to(dev), tgt.to(dev)
    for i in range(a.steps):
        losses = []
        log(f"=== step {i}")
        t = time.perf_counter()
        sched.step(*((ids,) if rank == 0 else ()), **(dict(target=tgt, losses=losses) if rank == 1 else {}))
        if dev.type == "cuda": torch.cuda.synchronize()
        if rank == 1:
            print(json.dumps(dict(schedule=a.schedule, attn=a.attn, dtype=str(dtype), step=i, s=round(time.perf_counter() - t, 3),
                                  losses=[round(float(l), 4) for l in losses], unsplit=[round(x, 4) for x in ref] if i == 0 else None)), flush=True)
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
