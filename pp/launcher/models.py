"""Models the launcher trains: a small GPT, a residual MLP, a transformers class named `hf:Class`, or a
user's class named `package.module:Class`.

Every model maps a (batch, seq_len) tensor of token ids to (batch, seq_len, vocab_size) logits, so the
same data and loss serve all of them.
"""
from __future__ import annotations

import importlib
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.tp.styles import ColwiseParallel, RowwiseParallel

from .config import ConfigError, ModelConfig, is_custom_model, is_hf_model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token + position embedding, pre-norm blocks, final LayerNorm, LM head."""

    def __init__(self, vocab_size: int = 256, d_model: int = 64, n_layers: int = 4, n_heads: int = 4,
                 seq_len: int = 64, d_ff: int = 0, tie_weights: bool = False):
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        _init_weights(self, n_layers)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def tp_plan(self) -> dict:
        """Megatron's tensor-parallel plan: qkv and fc column-wise (local heads, local MLP width),
        the out-projections row-wise (one all-reduce each); embeddings, norms and head replicated."""
        plan: dict = {}
        for i in range(len(self.blocks)):
            plan.update(_mlp_plan(f"blocks.{i}.mlp"))
            plan[f"blocks.{i}.attn.qkv"] = ColwiseParallel()
            plan[f"blocks.{i}.attn.proj"] = RowwiseParallel()
        return plan


class ResidualMLP(nn.Module):
    """Per-token model: embedding, residual MLP blocks, LayerNorm, LM head (a bigram-style baseline)."""

    def __init__(self, vocab_size: int = 256, d_model: int = 64, n_layers: int = 4, d_ff: int = 0):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(_NormedMLP(d_model, d_ff or 4 * d_model) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        _init_weights(self, n_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def tp_plan(self) -> dict:
        """Tensor-parallel plan: each block's MLP fc column-wise, proj row-wise."""
        plan: dict = {}
        for i in range(len(self.blocks)):
            plan.update(_mlp_plan(f"blocks.{i}.mlp"))
        return plan


def _mlp_plan(prefix: str) -> dict:
    return {f"{prefix}.fc": ColwiseParallel(), f"{prefix}.proj": RowwiseParallel()}


class _NormedMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def _init_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)


def init_fn(cfg: ModelConfig, seed: int):
    """The built-in models' initialisation of one tensor, `fn(name, tensor)` in place, drawn from
    (seed, name) alone (`pp.parallel.meta.generator_for`), so that weights do not depend on pp/dp/tp:
    GPT-2's N(0, 0.02) for matrices (residual output projections scaled by 1/sqrt(2 * n_layers)),
    zero biases, unit norm weights. None for a custom model."""
    if cfg.name not in ("gpt", "mlp"):
        return None
    from pp.parallel.meta import generator_for

    def fill(name: str, t: torch.Tensor) -> None:
        if name.endswith("bias"):
            t.zero_()
        elif t.dim() >= 2:
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("proj.weight") else 0.02
            t.copy_(torch.empty(t.shape).normal_(0.0, std, generator=generator_for(seed, name)))
        else:
            t.fill_(1.0)
    return fill


def build_model(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32, device: str | None = None) -> nn.Module:
    """The model `cfg` names, initialised from `seed` (the same on every rank and for every pp); the
    built-in ones per tensor from (seed, name) (`init_fn`). `device="meta"` builds it without storage
    (built-in models only: a custom model is built on the CPU)."""
    torch.manual_seed(seed)
    fill = init_fn(cfg, seed)
    if fill is not None:
        with torch.device(device or "cpu"):
            if cfg.name == "gpt":
                model: nn.Module = GPT(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len,
                                       cfg.d_ff, cfg.tie_weights)
            else:
                model = ResidualMLP(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff)
        if device != "meta":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    fill(name, p)
    elif is_hf_model(cfg.name):
        from pp import hf

        try:
            cls = hf.hf_class(cfg.name)
            model = hf.build_hf_model(cls, cls.config_class.from_dict(cfg.config))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif is_custom_model(cfg.name):
        cls = import_model_class(cfg.name)
        try:
            model = cls(**constructor_args(cls, cfg.args))
        except TypeError as e:
            raise ConfigError(f"model.name={cfg.name!r} could not be built from the arguments {sorted(cfg.args)} "
                              f"(the model section's other keys): {e}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.name={cfg.name!r} built a {type(model).__name__}, not a torch.nn.Module")
    else:
        raise ConfigError(f"model.name={cfg.name!r} is unknown: use 'gpt', 'mlp', 'hf:ClassName' or "
                          f"'package.module:ClassName'")
    return model.to(dtype)


def init_options(cfg: ModelConfig) -> dict:
    """load_weights options for model.init_from: an hf class's base-model prefix and ignored keys."""
    if not is_hf_model(cfg.name):
        return {}
    from pp.hf import hf_class

    cls = hf_class(cfg.name)
    return {"base_prefix": cls.base_model_prefix or None,
            "ignore_unexpected": list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ()),
            "ignore_missing": list(getattr(cls, "_keys_to_ignore_on_load_missing", None) or ())}


def constructor_args(cls: type, args: dict) -> dict:
    """`args` for `cls(...)`: seq_len and vocab_size (also the data's settings) only where `cls` takes them."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(args)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in args.items() if k not in ("seq_len", "vocab_size") or takes_any or k in params}


def import_model_class(name: str) -> type:
    """`package.module:ClassName` -> the class, or ConfigError saying which part was not found."""
    module_name, _, cls_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.name={name!r}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"model.name={name!r}: module {module_name!r} has no attribute {cls_name!r}")
    return cls
