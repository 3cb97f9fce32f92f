"""The benchmark's GPT, built segment by segment (embedding, blocks, head) so that any cut gives both
runtimes the very same stage modules, and the cuts themselves (even, estimated cost, measured cost)."""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import pp

class Embed(nn.Module):
    def __init__(self, vocab: int, d: int, seq: int, dd: dict):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, **dd)
        self.pos = nn.Embedding(seq, d, **dd)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return self.tok(tokens) + self.pos(pos)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dd: dict):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d, **dd)
        self.qkv = nn.Linear(d, 3 * d, bias=False, **dd)
        self.proj = nn.Linear(d, d, bias=False, **dd)
        self.ln2 = nn.LayerNorm(d, **dd)
        self.fc1 = nn.Linear(d, 4 * d, bias=False, **dd)
        self.fc2 = nn.Linear(4 * d, d, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class Head(nn.Module):
    def __init__(self, d: int, vocab: int, dd: dict):
        super().__init__()
        self.ln = nn.LayerNorm(d, **dd)
        self.out = nn.Linear(d, vocab, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class StageModule(nn.Module):
    """One stage: [embedding] + blocks + [head]."""

    def __init__(self, embed: nn.Module | None, blocks: list[nn.Module], head: nn.Module | None):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x


def _init_(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
    return module


def build_segment(kind: str, index: int, cfg: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """One segment, seeded by its position in the model alone: the same weights whatever the cut."""
    dd = dict(device=device, dtype=dtype)
    seg = {"embed": 0, "block": 1 + index, "head": cfg.layers + 1}[kind]
    torch.manual_seed(cfg.seed * 1_000_003 + seg)
    if kind == "embed":
        return _init_(Embed(cfg.vocab, cfg.d_model, cfg.seq, dd))
    if kind == "head":
        return _init_(Head(cfg.d_model, cfg.vocab, dd))
    return _init_(Block(cfg.d_model, cfg.heads, dd))


def build_stage_module(stage: int, ranges: list[tuple[int, int]], cfg, device, dtype) -> StageModule:
    lo, hi = ranges[stage]
    embed = build_segment("embed", 0, cfg, device, dtype) if stage == 0 else None
    blocks = [build_segment("block", i, cfg, device, dtype) for i in range(lo, hi)]
    head = build_segment("head", 0, cfg, device, dtype) if stage == len(ranges) - 1 else None
    return StageModule(embed, blocks, head)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


def segment_costs(cfg) -> dict[str, float]:
    """Estimated forward FLOPs per token of each segment (see the module docstring)."""
    d, s, v = cfg.d_model, cfg.seq, cfg.vocab
    costs = {"embed": 0.0}
    for i in range(cfg.layers):
        costs[f"blocks.{i}"] = 24.0 * d * d + 4.0 * s * d
    costs["head"] = 2.0 * d * v
    return costs


def block_ranges(cfg, n_stages: int, split: str,
                 measure: Callable | None = None) -> list[tuple[int, int]]:
    """[lo, hi) of the blocks on each stage (stage 0 also has the embedding, the last one the head);
    `measure(cfg)` gives the segment costs of the measured split."""
    L = cfg.layers
    if split == "even":
        if L < n_stages:
            raise ValueError(f"--split even needs at least one block per stage: {L} layers for {n_stages} stages")
        base, extra = divmod(L, n_stages)
        counts = [base + (1 if k < extra else 0) for k in range(n_stages)]
    elif split in ("cost", "measured"):
        costs = segment_costs(cfg) if split == "cost" else measure(cfg)
        segments = [pp.Segment(name) for name in costs]
        starts = pp.split_by_cost(n_stages, costs)(segments) + [len(segments)]
        # segment j is block j-1; stage k holds segments starts[k]..starts[k+1]-1
        counts = []
        for k in range(n_stages):
            lo, hi = starts[k], starts[k + 1]
            counts.append(sum(1 for j in range(lo, hi) if 1 <= j <= L))
    else:
        raise ValueError(f"unknown split {split!r}: expected 'even', 'cost' or 'measured'")
    ranges, lo = [], 0
    for c in counts:
        ranges.append((lo, lo + c))
        lo += c
    return ranges


# ------------------------------------------------------------------------- hf-llama (issue 16, item 6)

def hf_llama_sizes(cfg) -> tuple[int, int]:
    """(MLP width, KV heads) of `--model hf-llama`: --d-ff / --kv-heads, by default 11/4 x d_model rounded
    up to a multiple of 256 (5632 for 2048) and half the heads (8 of 16), as in TinyLlama."""
    d_ff = cfg.d_ff or -(-cfg.d_model * 11 // 4 // 256) * 256
    return d_ff, cfg.kv_heads or max(1, cfg.heads // 2)


def hf_llama(cfg, device, dtype) -> nn.Module:
    """transformers' LlamaForCausalLM from a config (random weights, sdpa attention), as pp.run builds
    `hf:LlamaForCausalLM`: forward(input_ids) returns the logits."""
    import transformers

    from pp.hf import build_hf_model

    d_ff, kv = hf_llama_sizes(cfg)
    config = transformers.LlamaConfig(hidden_size=cfg.d_model, intermediate_size=d_ff, num_hidden_layers=cfg.layers,
                                      num_attention_heads=cfg.heads, num_key_value_heads=kv, vocab_size=cfg.vocab,
                                      max_position_embeddings=cfg.seq, attn_implementation="sdpa")
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = build_hf_model(transformers.LlamaForCausalLM, config)
    return model.to(dtype)


def hf_llama_pipe(cfg, n_stages: int, device, dtype, example: torch.Tensor) -> tuple["pp.Pipe", list[tuple[int, int]]]:
    """The hf-llama model traced and cut by pp.pipeline: `--split even` at model.layers.<k> boundaries,
    `--split cost` by pp.split_by_cost over the traced graph; also the [lo, hi) layers of each stage."""
    model = hf_llama(cfg, device, dtype)
    if cfg.split == "even":
        if cfg.layers < n_stages:
            raise ValueError(f"--split even needs at least one layer per stage: {cfg.layers} for {n_stages} stages")
        base, extra = divmod(cfg.layers, n_stages)
        starts = [k * base + min(k, extra) for k in range(1, n_stages)]
        pipe = pp.pipeline(model, (example,), split_spec={f"model.layers.{i}": pp.SplitPoint.BEGINNING for i in starts})
    elif cfg.split == "cost":
        pipe = pp.pipeline(model, (example,), split_policy=pp.split_by_cost(n_stages))
    else:
        raise ValueError(f"--split {cfg.split} is for the gpt model; hf-llama takes even or cost")
    ranges = []
    for s in range(n_stages):
        layers = sorted({int(n.split(".")[2]) for n, _ in pipe.get_stage_module(s).named_parameters()
                         if n.startswith("model.layers.")})
        lo = ranges[-1][1] if ranges else 0
        ranges.append((lo, lo + len(layers)))
    return pipe, ranges


def time_alone_pipe(pipe, mine: list[int], tokens: torch.Tensor, targets: torch.Tensor, sync: Callable,
                    warmup: int = 2, repeats: int = 5) -> dict[int, float]:
    """Seconds of fwd+bwd of each of `mine` stages of `pipe` on one microbatch alone; the inputs of a stage
    come from running the stages before it (every stage module is still on this rank)."""
    import time

    from pp.stage.pipe import MODEL_INPUT

    info = pipe.info()
    flat = info.input_binder.flatten((tokens,), {})
    outputs: list[tuple] = []
    with torch.no_grad():
        for s, io in enumerate(info.stage_io[:max(mine) + 1]):
            outputs.append(tuple(pipe.get_stage_module(s)(
                *[flat[i] if src == MODEL_INPUT else outputs[src][i] for src, i in io.input_sources])))
    times = {}
    for s in mine:
        mod, io = pipe.get_stage_module(s), info.stage_io[s]
        inputs = [(flat[i] if src == MODEL_INPUT else outputs[src][i]).detach() for src, i in io.input_sources]
        inputs = [x.requires_grad_() if x.is_floating_point() else x for x in inputs]
        last = s == info.num_stages - 1
        grads = None if last else [torch.randn_like(o) if o.is_floating_point() else None for o in outputs[s]]

        def once():
            out = mod(*inputs)
            if last:
                loss_fn(out[0], targets).backward()
            else:
                pairs = [(o, g) for o, g in zip(out, grads) if g is not None and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

        for _ in range(warmup):
            once()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        sync()
        times[s] = (time.perf_counter() - t0) / repeats
        mod.zero_grad(set_to_none=True)
    return times
