"""Small deterministic seed models shared by the splitter and runtime tests, and checks against them.

Each model builds its weights from a fixed seed (`build(cls, ...)`), runs on CPU in milliseconds, and
exercises one thing the splitter must get right (a skip past a neighbour, a shared or aliased
parameter, a buffer crossing a cut, ...). `check_equivalent` compares a `Pipe` with the unsplit model.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

import pp
from pp import pipe_split

D = 8      # hidden size of the small models
BATCH = 4  # rows of one example microbatch


def build(cls: type[nn.Module], *args, seed: int = 0, **kwargs) -> nn.Module:
    """`cls(*args, **kwargs)` with weights from a fixed seed, so every test and rank gets the same model."""
    torch.manual_seed(seed)
    return cls(*args, **kwargs)


def example(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- pipe_split models

class ExampleCode(nn.Module):
    """torch's pipelining seed model: raw matmuls, linears, a buffer, a skip across two cuts; 4 stages."""

    def __init__(self, d: int = D):
        super().__init__()
        self.mm_param0 = nn.Parameter(torch.randn(d, d))
        self.mm_param1 = nn.Parameter(torch.randn(d, d))
        self.mm_param2 = nn.Parameter(torch.randn(d, d))
        self.register_buffer("cval", torch.randn(d))
        self.lin0 = nn.Linear(d, d)
        self.lin1 = nn.Linear(d, d)

    def forward(self, x, y=None):
        x = torch.mm(x, self.mm_param0)
        if y is not None:
            x = x + y
        skip = torch.relu(x)
        x = skip + self.cval
        pipe_split()
        x = self.lin0(torch.mm(x, self.mm_param1))
        pipe_split()
        x = torch.relu(x) + skip
        x = torch.mm(x, self.mm_param2)
        pipe_split()
        return torch.relu(self.lin1(x))


class MLP(nn.Module):
    def __init__(self, d: int = D, hidden: int = 2 * D):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)))


class MLPWithSplit(nn.Module):
    """Two MLPs with one pipe_split() between them: 2 stages."""

    def __init__(self, d: int = D):
        super().__init__()
        self.mlp0 = MLP(d)
        self.mlp1 = MLP(d)

    def forward(self, x):
        x = self.mlp0(x)
        pipe_split()
        return self.mlp1(x)


class MultiMLP(nn.Module):
    """`n` MLPs with a pipe_split() after each but the last: n stages."""

    def __init__(self, d: int = D, n: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(MLP(d) for _ in range(n))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if i:
                pipe_split()
            x = layer(x)
        return x


class MLPStack(nn.Module):
    """`n` MLPs in a ModuleList and no markers: cut it with split_spec or a split_policy."""

    def __init__(self, d: int = D, n: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(MLP(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class UnevenStack(nn.Module):
    """A ModuleList of layers with different parameter counts: layer i is `widths[i]` Linear(D, D)s."""

    def __init__(self, widths: tuple[int, ...] = (4, 1, 1, 1, 1), d: int = D):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(*(nn.Linear(d, d) for _ in range(w))) for w in widths)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


# ------------------------------------------------------------------------------------------ transformer

class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Decoder-only LM: token + position embedding, sdpa blocks, final LayerNorm, LM head."""

    def __init__(self, vocab: int = 32, d: int = 16, heads: int = 2, n_layers: int = 3, seq: int = 8,
                 tie_weights: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tokens(batch: int = BATCH, seq: int = 8, vocab: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------- one behaviour each

class KwargsModel(nn.Module):
    """Keyword inputs with defaults: an optional tensor, a non-tensor scale, a tensor default (as in
    torch's seed model) and a keyword-only tensor."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin0 = nn.Linear(d, d)
        self.lin1 = nn.Linear(d, d)

    def forward(self, x, y=None, scale: float = 2.0, shift: torch.Tensor = torch.full((D,), 0.5), *, bias=None):
        x = self.lin0(x) * scale + shift
        if y is not None:
            x = x + y
        pipe_split()
        x = self.lin1(x)
        if bias is not None:
            x = x + bias
        return x


class BufferAcrossCut(nn.Module):
    """Buffers across a cut: `offset` read by both stages, `calls` updated in stage 0 and its new value
    read in stage 1, `ema` read (old value) in stage 0 and updated in stage 1, `scratch` non-persistent."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin0 = nn.Linear(d, d)
        self.lin1 = nn.Linear(d, d)
        self.register_buffer("offset", torch.randn(d))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(d))
        self.register_buffer("scratch", torch.ones(d), persistent=False)

    def forward(self, x):
        h = self.lin0(x) * self.offset + self.ema
        self.calls.add_(1)
        pipe_split()
        out = self.lin1(h) * self.calls + self.offset * self.scratch
        self.ema.mul_(0.9).add_(0.1 * out.detach().mean(0))
        return out


class ConvBN(nn.Module):
    """conv -> batch-norm -> relu | conv -> batch-norm -> pool -> linear: running stats in both stages."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        self.conv0 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        pipe_split()
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class SharedParam(nn.Module):
    """One parameter used by stages 0 and 2."""

    def __init__(self, d: int = D):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        x = torch.tanh(x @ self.w)
        pipe_split()
        x = self.lin(x)
        pipe_split()
        return torch.tanh(x @ self.w.t())


class AliasedParam(nn.Module):
    """One parameter under two names (`self.a = self.b`), read through each name in another stage."""

    def __init__(self, d: int = D):
        super().__init__()
        self.a = self.b = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        x = torch.tanh(x @ self.a)
        pipe_split()
        x = self.lin(x)
        pipe_split()
        return x @ self.b


class SkipPastNeighbour(nn.Module):
    """A value made in stage 0 and read only by stage 2, and a model input read only by stage 2."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin0 = nn.Linear(d, d)
        self.lin1 = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)

    def forward(self, x, y):
        skip = torch.sigmoid(self.lin0(x))
        h = skip * 2.0
        pipe_split()
        h = self.lin1(h)
        pipe_split()
        return self.lin2(h) + skip + y


class InplaceAfterCut(nn.Module):
    """In-place ops right after a cut on the tensor that crossed it, in stages 1 and 2; stage 2 reads the
    updated tensor, and the output returns an alias taken before the cut (which, as in eager, sees the
    updates)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin0 = nn.Linear(d, d)
        self.lin1 = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)

    def forward(self, x):
        x = self.lin0(x)
        alias = x
        pipe_split()
        x.add_(1.0)
        x.mul_(0.5)
        y = self.lin1(x)
        pipe_split()
        y.sub_(0.25)
        return self.lin2(y) + x, alias


class StructuredIO(nn.Module):
    """Dict output with a nested tuple, None, an int and the model input itself (forwarded from stage 0
    to the last stage); chunks of one op's tuple result cross a cut."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin0 = nn.Linear(d, d)
        self.lin1 = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)

    def forward(self, x):
        a, b = self.lin0(x).chunk(2, dim=-1)
        width = a.shape[-1]
        pipe_split()
        h = self.lin1(torch.cat([b, a], dim=-1))
        extra = None
        pipe_split()
        out = self.lin2(h)
        return {"out": out, "pair": (a, h), "none": extra, "width": width, "input": x}


class AttentionModel(nn.Module):
    """Linear -> layer-norm -> sdpa attention | LayerNorm -> linear: attention with a cut after it."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.inp = nn.Linear(D, d)
        self.ln = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, D)

    def forward(self, x):
        x = self.attn(self.ln(self.inp(x)))
        pipe_split()
        return self.out(self.ln_out(x))


class LooseEnds(nn.Module):
    """What is easy to drop: an unused layer and buffer, a plain tensor attribute (a constant) read by
    both stages, an arange recomputed after the cut, integer tensors crossing it, a non-persistent buffer
    overwritten without being read."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin0 = nn.Linear(d, d)
        self.unused = nn.Linear(d, 3)
        self.lin1 = nn.Linear(d, d)
        self.mask = torch.tril(torch.ones(d, d))
        self.register_buffer("unused_buf", torch.ones(2))
        self.register_buffer("last", torch.zeros(BATCH, d), persistent=False)

    def forward(self, x, ids):
        h = self.lin0(x) @ self.mask
        top = h.argmax(-1)
        pipe_split()
        h = self.lin1(h) @ self.mask + torch.arange(h.shape[-1], dtype=h.dtype)
        self.last.copy_(h.detach())
        return h + top.unsqueeze(-1) + ids.float().unsqueeze(-1)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: export cannot trace it."""

    def __init__(self, d: int = D):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        x = self.lin(x)
        if x.sum() > 0:
            x = x * 2
        return x


class BigEmbeddingLM(nn.Module):
    """Huge vocabulary, few small blocks: the embedding has most parameters but does almost no work."""

    def __init__(self, vocab: int = 1024, d: int = 32, n_layers: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MLP(d, 4 * d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


# ----------------------------------------------------------------------------------------------- checks

def _flat_tensors(value) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def default_loss(outputs) -> torch.Tensor:
    return sum((t.float() ** 2).mean() for t in _flat_tensors(outputs) if t.is_floating_point())


def as_tuple(outputs) -> tuple:
    """The model's outputs in the layout `Pipe.__call__` returns: a tuple or list as a tuple, anything
    else (a tensor, a dict) as a 1-tuple."""
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def check_equivalent(model: nn.Module, args: tuple, kwargs: dict | None = None, *, calls: int = 1,
                     loss_fn: Callable = default_loss, **pipeline_kwargs) -> pp.Pipe:
    """Build a pipe from `model` and check it against an untouched copy of the model, `calls` times:
    outputs, the gradient of every parameter as the stage modules hold it, and every stage's buffers.
    Also checks the stages' names (`check_stage_names`). Returns the pipe."""
    kwargs = kwargs or {}
    reference = copy.deepcopy(model)
    pipe = pp.pipeline(model, args, kwargs, **pipeline_kwargs)
    check_stage_names(reference, pipe)
    for _ in range(calls):
        expected = reference(*args, **kwargs)
        got = pipe(*args, **kwargs)
        assert isinstance(got, tuple), f"pipe returned {type(got).__name__}, expected a tuple"
        torch.testing.assert_close(got, as_tuple(expected))
        loss_fn(expected).backward()
        loss_fn(got).backward()
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    ref_buffers = dict(reference.named_buffers(remove_duplicate=False))
    for s in range(pipe.num_stages):
        stage = pipe.get_stage_module(s)
        for name, p in stage.named_parameters(remove_duplicate=False):
            ref = ref_params[name]
            assert (p.grad is None) == (ref.grad is None), f"stage {s}: {name} has a gradient on one side only"
            if ref.grad is not None:
                torch.testing.assert_close(p.grad, ref.grad, msg=lambda m, n=name: f"grad of {n}: {m}")
        for name, b in stage.named_buffers():
            if name in ref_buffers:
                torch.testing.assert_close(b, ref_buffers[name], msg=lambda m, n=name: f"buffer {n}: {m}")
    return pipe


def check_stage_names(model: nn.Module, pipe: pp.Pipe) -> None:
    """State-dict keys of every stage are the model's; every parameter is in some stage, and a
    parameter that only one stage uses is in exactly one stage."""
    original = set(model.state_dict())
    holders: dict[str, list[int]] = {}
    for s in range(pipe.num_stages):
        stage = pipe.get_stage_module(s)
        keys = set(stage.state_dict())
        assert keys <= original, f"stage {s} has names the model lacks: {sorted(keys - original)}"
        for name, _ in stage.named_parameters(remove_duplicate=False):
            holders.setdefault(name, []).append(s)
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    missing = [n for n in all_names if n not in holders]
    assert not missing, f"parameters in no stage: {missing}"
    shared = pipe.info().shared_params
    for name, stages in holders.items():
        if name not in shared and not any(n in shared for n in _aliases(model, name)):
            assert len(stages) == 1, f"{name} is in stages {stages} but not marked shared"


def _aliases(model: nn.Module, name: str) -> list[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return [n for n, p in params.items() if p is params[name]]
