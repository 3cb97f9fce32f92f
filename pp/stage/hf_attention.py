"""Hugging Face models traced with the attention their eager forward uses.

Eagerly, a transformers model with `attn_implementation="sdpa"` and no padding mask calls
`scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`: no mask tensor, no repeated
key/value heads, and the flash kernels. While torch.export traces it, transformers keeps the mask
(`masking_utils._ignore_causal_mask_sdpa` refuses to skip it under export, since an exported decoder may
later run one query token against a longer cache) and so also repeats the key/value heads: every stage
then builds a causal mask per microbatch, copies K and V once per head group, and runs the masked
attention kernels — about a fifth more time per microbatch on the host and the device (an HF Llama on
one H200).

pp's stages never hold a cache (`use_cache=False`), so query and key lengths are always equal and the
eager choice is right for every input size. `eager_attention_for_export` registers one attention
implementation, `pp_sdpa`, for the span of a trace: transformers' own sdpa attention, with a mask
function that returns no mask exactly where the eager forward would skip it (the plain causal or
bidirectional mask, no padding mask given) and transformers' own sdpa mask otherwise (sliding windows,
padding, packed sequences, custom mask functions). One more eager decision is made by value: a model
called without `position_ids` numbers each row 0..n-1 itself, which the eager forward finds to be one
sequence per row (no packed-sequence mask); under export transformers cannot read the values and keeps a
packed-sequence mask, so while such a call is traced that finding is given directly. A call that passes
`position_ids` or an `attention_mask` keeps transformers' traced masks. Models whose code does not go
through transformers' attention interface are left as they are.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from torch import nn

__all__ = ["eager_attention_for_export"]

NAME = "pp_sdpa"


def _sdpa_mask_as_eager(**kwargs: Any) -> Any:
    """transformers' sdpa mask, except None where the eager forward would pass `is_causal` instead."""
    from transformers import masking_utils as mu

    fn = kwargs.get("mask_function")
    q, kv = kwargs.get("q_length"), kwargs.get("kv_length")
    # is_causal aligns the mask upper-left: right only for as many keys as queries (no cache); a size
    # transformers does not pass here (older versions) is the query's, as pp's stages hold no cache
    same_length = q is None or q is kv or (isinstance(q, int) and isinstance(kv, int) and q == kv)
    if kwargs.get("attention_mask") is None and kwargs.get("local_size") is None:
        if fn is mu.causal_mask_function and kwargs.get("allow_is_causal_skip", True) and same_length:
            return None
        if fn is getattr(mu, "bidirectional_mask_function", None) and kwargs.get("allow_is_bidirectional_skip", False):
            return None
    return mu.sdpa_mask(**kwargs)


def _models(module: nn.Module) -> list[nn.Module]:
    """The transformers models inside `module` (itself included) that go through transformers' attention
    interface."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if base is None:   # never imported: no transformers model can be inside
        return []
    return [sub for sub in module.modules()
            if isinstance(sub, base) and getattr(type(sub), "_supports_attention_backend", False)]


def _configs(module: nn.Module) -> list[Any]:
    """The configs (and their sub-configs) of `_models(module)` whose attention implementation is sdpa."""
    found: dict[int, Any] = {}
    for sub in _models(module):
        stack = [getattr(sub, "config", None)]
        while stack:
            cfg = stack.pop()
            if cfg is None or id(cfg) in found:
                continue
            if getattr(cfg, "_attn_implementation_internal", None) == "sdpa":
                found[id(cfg)] = cfg
            stack.extend(getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}) or {})
    return list(found.values())


@contextlib.contextmanager
def eager_attention_for_export(module: nn.Module) -> Iterator[None]:
    """While tracing `module`, let the transformers models inside it (attention implementation `sdpa`)
    trace with the attention their eager forward uses (see the module docstring); restored after.
    A no-op for modules without such a model, and when transformers lacks the registries this needs."""
    configs = _configs(module)
    if not configs:
        yield
        return
    try:
        from transformers import masking_utils as mu
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import AttentionInterface
        mask_interface = mu.AttentionMaskInterface
    except (ImportError, AttributeError):   # an older transformers: trace as it is
        yield
        return
    AttentionInterface.register(NAME, sdpa_attention_forward)
    mask_interface.register(NAME, _sdpa_mask_as_eager)
    own_positions: list[bool] = []     # per traced model call: numbered by the model itself, no padding mask
    find_packed = getattr(mu, "find_packed_sequence_indices", None)

    def find_packed_as_eager(*args: Any, **kwargs: Any) -> Any:
        if own_positions and own_positions[-1]:
            return None      # what the eager forward finds for 0..n-1 in every row: one sequence each
        return find_packed(*args, **kwargs)

    def enter(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        own_positions.append(kwargs.get("position_ids") is None and kwargs.get("attention_mask") is None
                             and len(args) <= 1)

    def leave(*_: Any) -> None:
        own_positions.pop()

    hooks = []
    for sub in _models(module):
        hooks.append(sub.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(sub.register_forward_hook(leave, always_call=True))
    for cfg in configs:
        cfg._attn_implementation_internal = NAME
    if find_packed is not None:
        mu.find_packed_sequence_indices = find_packed_as_eager
    try:
        yield
    finally:
        if find_packed is not None:
            mu.find_packed_sequence_indices = find_packed
        for h in hooks:
            h.remove()
        for cfg in configs:
            cfg._attn_implementation_internal = "sdpa"
