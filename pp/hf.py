"""Hugging Face transformers models for pp: `hf:<ClassName>` resolved to a class and a config, and the
model built so that its forward takes `input_ids` and returns the logits tensor (what pp's stages pass on).

transformers is imported only here and only when an `hf:` model is asked for, so pp runs without it.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["HF_PREFIX", "is_hf_name", "hf_class", "hf_config", "build_hf_model", "config_dict", "sizes_from_config"]

HF_PREFIX = "hf:"
# Keys every transformers config takes besides its own fields.
_BASE_KEYS = {"attn_implementation", "torch_dtype", "dtype", "name_or_path", "_name_or_path"}


def is_hf_name(name: str) -> bool:
    """Whether model name `name` asks for a transformers class (`hf:LlamaForCausalLM`)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError("hf: models need the transformers package: pip install 'pp[hf]' "
                         "(transformers and safetensors)") from None
    return transformers


def hf_class(name: str) -> type:
    """`hf:ClassName` -> the transformers model class; ValueError naming the class if there is none."""
    transformers = _transformers()
    cls_name = name[len(HF_PREFIX):] if is_hf_name(name) else name
    cls = getattr(transformers, cls_name, None) if cls_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        models = [n for n in dir(transformers) if n.endswith(("LMHeadModel", "ForCausalLM", "Model"))]
        close = difflib.get_close_matches(cls_name, models, n=1, cutoff=0.6)
        hint = f" (did you mean 'hf:{close[0]}'?)" if close else ""
        raise ValueError(f"model.name={name!r}: transformers {transformers.__version__} has no model class "
                         f"{cls_name!r}{hint}; expected e.g. 'hf:LlamaForCausalLM' or 'hf:GPT2LMHeadModel'")
    if cls.config_class is None:
        raise ValueError(f"model.name={name!r} is an abstract transformers class; name a concrete model class")
    return cls


def _known_keys(config_class: type) -> set[str]:
    keys = set(_BASE_KEYS) | set(getattr(config_class, "attribute_map", {}))
    for c in config_class.__mro__:
        if "__init__" in vars(c):
            keys |= {p for p in inspect.signature(c.__init__).parameters if p not in ("self", "kwargs")}
    try:
        keys |= set(config_class().to_dict())
    except Exception:  # noqa: BLE001 - a config without defaults; the signatures above remain
        pass
    return keys


def hf_config(cls: type, config: Mapping[str, Any] | str | None, init_from: str | None = None) -> Any:
    """The transformers config for model class `cls`: from a mapping of its fields, a config.json path
    (or a directory holding one), or else the config.json of the `init_from` directory.

    Raises ValueError naming a bad key (with the closest known one), a missing file, or a config.json
    written for another architecture.
    """
    config_class = cls.config_class
    name = f"hf:{cls.__name__}"
    if config is None:
        if init_from and os.path.isfile(os.path.join(init_from, "config.json")):
            config = os.path.join(init_from, "config.json")
        elif init_from and not os.path.exists(init_from):
            raise ValueError(f"model.init_from={init_from!r} does not exist (and model.config is not set, so "
                             f"{name} would take its config.json from there)")
        elif init_from:
            raise ValueError(f"model.init_from={init_from!r} has no config.json, and model.config is not set: "
                             f"give model.config (a mapping of {config_class.__name__} fields or a path to a "
                             f"config.json)")
        else:
            raise ValueError(f"model.name={name!r} needs model.config (a mapping of {config_class.__name__} "
                             f"fields or a path to a config.json), or model.init_from naming a directory "
                             f"with a config.json")
    if isinstance(config, str):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        if not os.path.isfile(path):
            raise ValueError(f"model.config={config!r}: no such file (expected a config.json or a mapping of "
                             f"{config_class.__name__} fields)")
        try:
            with open(path) as f:
                fields = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.config={config!r} is not a readable JSON file: {e}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"model.config={config!r} holds a {type(fields).__name__}, not a JSON object")
        kind = fields.get("model_type")
        if kind is not None and kind != config_class.model_type:
            raise ValueError(f"model.config={config!r} describes a {kind!r} model, but {name} needs a "
                             f"{config_class.model_type!r} config")
        return _built(config_class, fields, f"model.config={config!r}", lambda: config_class.from_dict(fields))
    if not isinstance(config, Mapping):
        raise ValueError(f"model.config: expected a mapping of {config_class.__name__} fields or a path to a "
                         f"config.json, got {config!r}")
    known = _known_keys(config_class)
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model.config has {unknown[0]!r}{hint}, which is not a field of "
                         f"{config_class.__name__}")
    fields = dict(config)
    for key, value in fields.items():   # YAML's .nan / .inf: transformers would carry them as {'__float__': ...}
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"model.config {key}={value}: expected a finite number")
    if fields.get("model_type", config_class.model_type) != config_class.model_type:
        raise ValueError(f"model.config has model_type={fields['model_type']!r}, but {name} needs "
                         f"{config_class.model_type!r}")
    fields.pop("model_type", None)
    return _built(config_class, fields, "model.config", lambda: config_class(**fields))


def _built(config_class: type, fields: Mapping[str, Any], what: str, build: Any) -> Any:
    """`build()`, with whatever transformers raises for bad values (TypeError, ValueError, and
    huggingface_hub's strict-dataclass validation errors, which are neither) as one ValueError line."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - any rejection of the user's values is a bad config
        reason = " ".join(str(e).split())
        if len(reason) > 300:
            reason = reason[:300] + "..."
        texts = [k for k, v in fields.items() if isinstance(v, str) and _is_number(v)]
        hint = (f" ({texts[0]}={fields[texts[0]]!r} is text: YAML reads a number like 1e-5 as a string; "
                f"write 1.0e-5)") if texts else ""
        raise ValueError(f"{what} was rejected by {config_class.__name__}: {reason}{hint}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def config_dict(config: Any) -> dict:
    """The whole config as plain JSON data (what config.json holds)."""
    return json.loads(config.to_json_string(use_diff=False))


def sizes_from_config(config: Any) -> dict[str, int | None]:
    """{'seq_len': ..., 'vocab_size': ...} read from a transformers config (None where it has none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    seq = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            seq = value
            break
    vocab = getattr(text, "vocab_size", None)
    return {"seq_len": seq, "vocab_size": vocab if isinstance(vocab, int) else None}


_LOGITS_CLASSES: dict[tuple[type, bool], type] = {}


def _logits_class(cls: type, aux: bool = False) -> type:
    """A subclass of `cls` whose forward(input_ids) returns the logits tensor alone, or with `aux` the pair
    (logits, router_aux_loss_coef x aux_loss): a mixture-of-experts model's load-balancing loss, scaled
    as its own `out.loss` adds it, for `pp.launcher.rank.lm_loss` to add to the next-token loss."""
    if (cls, aux) not in _LOGITS_CLASSES:
        def forward(self, input_ids: torch.Tensor) -> Any:
            out = cls.forward(self, input_ids=input_ids)
            logits = getattr(out, "logits", None)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"{cls.__name__}.forward returned {type(out).__name__} without a logits tensor; "
                                f"pp.run trains models that map input_ids to logits (e.g. a ...ForCausalLM class)")
            if not aux:
                return logits
            loss = getattr(out, "aux_loss", None)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"{cls.__name__} has output_router_logits=True but returned no aux_loss tensor; "
                                f"set output_router_logits to false")
            return logits, loss * self.config.router_aux_loss_coef

        what = "(logits, router_aux_loss_coef * aux_loss)" if aux else "logits"
        forward.__doc__ = f"{cls.__name__}.forward(input_ids) -> {what}: logits (batch, seq) ids -> (batch, seq, vocab)."
        _LOGITS_CLASSES[cls, aux] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__,
                                                                "_pp_hf_class": cls})
    return _LOGITS_CLASSES[cls, aux]


def build_hf_model(cls: type, config: Any) -> nn.Module:
    """`cls(config)` with the settings tracing needs (no cache, a return object), whose forward takes
    `input_ids` and returns the logits; parameter names are the class's own (`model.layers.0...`). With
    `output_router_logits` (Mixtral, Qwen2-MoE) it returns (logits, router_aux_loss_coef x aux_loss), and
    pp.run's loss adds the router's load-balancing loss as the model's own `out.loss` does.

    Raises ValueError for an encoder-decoder class (its forward needs decoder inputs too).
    """
    config = cls.config_class.from_dict(config_dict(config))  # a copy: the caller's config stays as it was
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model.name='hf:{cls.__name__}' is an encoder-decoder model, whose forward needs "
                         f"decoder inputs too; pp.run trains models that map input_ids to logits (decoder-only); "
                         f"pipeline it with pp.pipeline and your own inputs instead")
    aux = bool(getattr(config, "output_router_logits", False))
    coef = getattr(config, "router_aux_loss_coef", None)
    if aux and (not isinstance(coef, (int, float)) or isinstance(coef, bool) or not coef >= 0):
        raise ValueError(f"model.config output_router_logits=True ({cls.__name__}) needs a router_aux_loss_coef "
                         f">= 0 (a negative one rewards routing every token to the same experts), got {coef!r}")
    config.use_cache = False
    config.return_dict = True
    model = cls(config)
    model.__class__ = _logits_class(cls, aux)
    return model


def original_class(model: nn.Module) -> type:
    """The transformers class of a model built by `build_hf_model` (the class itself otherwise)."""
    return getattr(type(model), "_pp_hf_class", type(model))


_converted: dict[tuple[str, str], dict | None] = {}   # (class name, directory) -> its state dict, once per process


def converted_weights(name: str, config: Mapping[str, Any], path: str) -> dict[str, torch.Tensor] | None:
    """The state dict transformers' own `from_pretrained` makes of the model directory `path` for model
    `name` ('hf:ClassName') built from `config`: float32, on the CPU. transformers converts checkpoint
    layouts older than its classes as it loads them (its `save_pretrained` writes Mixtral's experts as
    per-expert `w1`/`w2`/`w3`, which its class holds fused), so a directory whose names do not fit the
    class as they are may still be that model. None where transformers cannot load it either, or finds
    keys missing, unexpected or mis-shaped (it would initialise those afresh). Kept for
    the process (the check before training and the load reuse it); `forget_converted` lets it go."""
    key = (name, os.path.abspath(path))
    if key not in _converted:
        cls = hf_class(name)
        bars = _transformers().utils.logging
        shown, verbosity = bars.is_progress_bar_enabled(), bars.get_verbosity()
        bars.disable_progress_bar()   # one bar per rank is noise
        bars.set_verbosity_error()    # its load report on weights that do not fit: pp names them in one line
        try:
            model, info = cls.from_pretrained(path, config=cls.config_class.from_dict(dict(config)),
                                              dtype=torch.float32, output_loading_info=True)
            # a directory that fits only in part (transformers initialises the rest) is not this model
            fits = not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
            _converted[key] = {k: v.detach() for k, v in model.state_dict().items()} if fits else None
        except Exception:  # noqa: BLE001 - transformers refuses it too: the caller reports its own finding
            _converted[key] = None
        finally:
            bars.set_verbosity(verbosity)
            if shown:
                bars.enable_progress_bar()
    return _converted[key]


def forget_converted() -> None:
    """Drop the state dicts `converted_weights` keeps."""
    _converted.clear()
