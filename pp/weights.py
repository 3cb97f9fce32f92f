"""Initial weights from files: a Hugging Face model directory, a .safetensors file, a torch.save state dict
or a pp checkpoint, loaded into a whole model or into this rank's stages of a `ParallelModel`.

A source is opened lazily (safetensors headers, DCP metadata, a memory-mapped torch file), so each rank
reads only the tensors of its own stages. Everything is checked before anything is copied: missing,
unexpected and mis-shaped keys, and tensors of another kind of dtype (integers for a floating parameter),
become one `WeightsError` listing them, raised on every rank alike; the values are read once to check
that every parameter is finite, and again to copy them in. A tensor the model ties under several names
(an embedding shared with the LM head) is stored once and fills every alias.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from pp.parallel.api import ParallelModel

__all__ = ["WeightsError", "WeightValuesError", "WeightSource", "open_weights", "load_weights"]

INDEX = "model.safetensors.index.json"
_READ_BATCH = 32


class WeightsError(ValueError):
    """Weights that do not fit the model or cannot be read; the message lists every offending key."""


class WeightValuesError(WeightsError):
    """Names and shapes fit, but a tensor holds the wrong kind of values: integers for a floating
    parameter (or the reverse), or NaN/inf. Converting the layout (transformers' `from_pretrained`)
    would not help, and would hide it. `detail` is the message without the source's name."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


# safetensors' dtype names (`get_slice(k).get_dtype()`), for the check before any data is read
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                       "U64": "uint64", "BOOL": "bool", "C64": "complex64", "C128": "complex128"}


class WeightSource:
    """Named tensors read on demand: `shapes` (all keys, no data read) and `read(keys)`."""

    def __init__(self, what: str, shapes: Mapping[str, tuple[int, ...]],
                 read: Callable[[list[str]], dict[str, torch.Tensor]], config_path: str | None = None,
                 dtypes: Mapping[str, torch.dtype] | None = None):
        self.what = what                    # e.g. "safetensors file x.safetensors", for messages
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes or {})    # the keys whose dtype the headers tell (checked before reading)
        self._read = read
        self.config_path = config_path      # the config.json beside the weights, if any

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys` (CPU), read from the file(s) now."""
        keys = list(keys)
        return self._read(keys) if keys else {}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], what: str = "the state dict") -> "WeightSource":
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(f"{what} holds non-tensor values under {bad[:5]}; expected a flat mapping of "
                               f"names to tensors")
        return cls(what, {k: tuple(v.shape) for k, v in state.items()}, lambda keys: {k: state[k] for k in keys},
                   dtypes={k: v.dtype for k, v in state.items()})


# ---------------------------------------------------------------------------------------------- sources

def _safetensors(files: dict[str, list[str]] | list[str], what: str, config_path: str | None) -> WeightSource:
    """Keys of one or more .safetensors files (`files`: paths, or {path: keys} from an index)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise WeightsError(f"reading {what} needs the safetensors package: pip install safetensors") from None
    where: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in files:
        if not os.path.isfile(path):
            raise WeightsError(f"{what}: file {path} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    where[k] = path
                    header = f.get_slice(k)
                    shapes[k] = tuple(header.get_shape())
                    dtype = getattr(torch, _SAFETENSORS_DTYPES.get(header.get_dtype(), ""), None)
                    if isinstance(dtype, torch.dtype):
                        dtypes[k] = dtype
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged header in any form
            raise WeightsError(f"{what}: {path} is not a readable safetensors file ({e})") from None

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(where[k], []).append(k)
        for path, ks in by_file.items():
            with safe_open(path, framework="pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out

    return WeightSource(what, shapes, read, config_path, dtypes)


def _torch_file(path: str) -> WeightSource:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled code, a damaged file, a non-torch file
        damaged = _damaged_torch_file(path, e)
        if damaged is not None:
            raise WeightsError(damaged) from None
        raise WeightsError(f"{path} is neither a .safetensors file nor a state dict saved with torch.save "
                           f"(torch.load(weights_only=True) failed: {_load_reason(e)}; pp reads weights only "
                           f"this way, as a weights file must not run code)") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    return WeightSource.from_state_dict(state, f"state dict {path}")


# how a torch.save file begins: a zip archive (torch >= 1.6), or the legacy format's pickled magic number
_ZIP_START = b"PK\x03\x04"
_LEGACY_START = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _damaged_torch_file(path: str, e: Exception) -> str | None:
    """The line for a file that torch.load could not read because it is empty, truncated or damaged (it
    begins as a torch.save file but is not a whole one), or None when that is not the cause."""
    size = os.path.getsize(path)
    if size == 0:
        return f"{path} is empty (0 bytes): expected a .safetensors file or a state dict saved with torch.save"
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_START))
    if head.startswith(_ZIP_START) and not zipfile.is_zipfile(path):
        reason = "its zip archive has no end record: the file was cut short"
    elif head.startswith(_ZIP_START) or head == _LEGACY_START:
        text = _load_reason(e)
        if not (isinstance(e, EOFError) or "EOF" in text or "corrupt" in text):
            return None
        reason = text.split(". ")[0].rstrip(".")
    else:
        return None
    return (f"{path} is damaged or truncated: it begins as a torch.save file but is not a complete one "
            f"({size} bytes; {reason}); save or copy it again")


def _load_reason(e: Exception) -> str:
    """The reason in torch.load's error, without its advice to turn weights_only off (pp never does)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        return f"the file is not a plain pickle of tensors ({detail})" if detail else "not a plain pickle of tensors"
    return text.splitlines()[0] if text else type(e).__name__


def _pp_checkpoint(path: str) -> WeightSource:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pp.launcher import checkpoint as ckpt

    skipped: list[str] = []
    try:
        path = ckpt.resolve(path, skipped.append)
    except ckpt.CheckpointError as e:
        raise WeightsError(str(e)) from None
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {k[len("model."):]: m for k, m in meta.items()
               if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        state = {k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype) for k in keys}
        with ckpt._single_process_quiet():
            dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
        return state

    note = f" ({'; '.join(skipped)})" if skipped else ""   # the newer damaged ones it passed over
    return WeightSource(f"pp checkpoint {path}{note}", {k: tuple(m.size) for k, m in tensors.items()}, read,
                        dtypes={k: m.properties.dtype for k, m in tensors.items()})


def _is_pp_checkpoint(path: str) -> bool:
    from pp.launcher import checkpoint as ckpt

    return (os.path.isfile(os.path.join(path, ckpt.MANIFEST)) or bool(ckpt.list_steps(path))
            or bool(ckpt.list_steps(os.path.join(path, "checkpoints"))))


def open_weights(path: str) -> WeightSource:
    """Open the weights at `path` without reading tensor data.

    `path` is a Hugging Face model directory (config.json + model.safetensors, or shards listed in
    model.safetensors.index.json), a .safetensors file, a state dict saved with torch.save (read with
    weights_only=True: a weights file never runs code), or a pp checkpoint (step-<N> directory, a
    checkpoints directory, or a run's output directory). Raises WeightsError if it is none of these.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return _safetensors([path], f"safetensors file {path}", None)
        if path.endswith(".json") and os.path.basename(path) == INDEX:
            return open_weights(os.path.dirname(path) or ".")
        return _torch_file(path)
    if not os.path.isdir(path):
        raise WeightsError(f"weights path {path!r} does not exist")
    config = os.path.join(path, "config.json")
    config = config if os.path.isfile(config) else None
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(os.path.join(path, name), []).append(key)
        return _safetensors(files, f"sharded safetensors in {path}", config)
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if shards:
        return _safetensors([os.path.join(path, n) for n in shards], f"safetensors in {path}", config)
    if _is_pp_checkpoint(path):
        return _pp_checkpoint(path)
    for name in ("pytorch_model.bin", "model.pt", "model.pth"):
        if os.path.isfile(os.path.join(path, name)):
            src = _torch_file(os.path.join(path, name))
            src.config_path = config
            return src
    raise WeightsError(f"{path} holds no weights pp can read: expected *.safetensors (with {INDEX} when "
                       f"sharded), pytorch_model.bin, or a pp checkpoint (step-<N>/manifest.json)")


# ------------------------------------------------------------------------------------------- matching

class _Target:
    """The tensors to fill: name -> tensor (this rank's part), the whole shape, and how to copy in."""

    def __init__(self, tensors: dict[str, torch.Tensor], full_shape: Callable[[str, torch.Tensor], tuple],
                 local: Callable[[str, torch.Tensor], torch.Tensor],
                 copy: Callable[[str, torch.Tensor], None] | None = None):
        self.tensors, self.full_shape, self.local = tensors, full_shape, local
        self.copy = copy or (lambda name, value: self.tensors[name].copy_(value))  # this rank's part in
        groups: dict[int, list[str]] = {}
        for name, t in tensors.items():
            groups.setdefault(id(t), []).append(name)
        self.groups = list(groups.values())   # aliases of one tensor, in state-dict order


def _module_target(module: nn.Module) -> _Target:
    return _Target(dict(module.state_dict(keep_vars=True)), lambda n, t: tuple(t.shape), lambda n, t: t)


def _parallel_target(model: "ParallelModel") -> _Target:
    tensors: dict[str, torch.Tensor] = {}
    for stage in model.stages:
        tensors.update(stage.submod.state_dict(keep_vars=True))

    def full_shape(name: str, t: torch.Tensor) -> tuple:
        shard = model.tp_shards.get(name)
        shape = list(t.shape)
        if shard is not None:  # uneven shards (torch.chunk's cut) record the whole length
            shape[shard.dim] = shard.length if shard.length is not None else shape[shard.dim] * model.tp
        return tuple(shape)

    sharded = model._sharded_names()   # ZeRO 2/3: the fp32 master shards hold these parameters

    def copy(name: str, value: torch.Tensor) -> None:
        if name in sharded:
            model.shards.load_whole(sharded[name], value)
        else:
            tensors[name].copy_(value)

    return _Target(tensors, full_shape, model.local_tensor, copy)


def _candidates(name: str, prefix: str | None) -> list[str]:
    """Keys that may hold `name`: itself, and with the base-model prefix dropped or added."""
    out = [name]
    if prefix:
        out.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
    return out


def _plan(target: _Target, source: WeightSource, prefix: str | None, ignore_missing: Sequence[str]
          ) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """({source key: group's first name} to read, missing names, mis-shaped and mis-typed descriptions)."""
    reads: dict[str, str] = {}
    missing, misshaped, mistyped = [], [], []
    shapes = source.shapes
    for group in target.groups:
        key = next((k for n in group for k in _candidates(n, prefix) if k in shapes), None)
        if key is None:
            if not any(re.search(p, n) for p in ignore_missing for n in group):
                missing.append(group[0] + (f" (or its alias {', '.join(group[1:])})" if len(group) > 1 else ""))
            continue
        want = target.full_shape(group[0], target.tensors[group[0]])
        if tuple(shapes[key]) != tuple(want):
            misshaped.append(f"{key} is {tuple(shapes[key])} there but {tuple(want)} in the model")
            continue
        wrong = _dtype_problem(key, source.dtypes.get(key), target.tensors[group[0]].dtype)
        if wrong is not None:
            mistyped.append(wrong)
            continue
        reads[key] = group[0]
    return reads, missing, misshaped, mistyped


def _dtype_problem(key: str, stored: torch.dtype | None, want: torch.dtype) -> str | None:
    """A description if a tensor of dtype `stored` cannot fill one of dtype `want` without losing what
    its values mean (integers or booleans for a floating tensor, floats truncated into an integer one;
    one floating dtype for another is a plain cast), else None."""
    if stored is None or want.is_complex:
        return None
    if want.is_floating_point and not stored.is_floating_point:
        kind = "a floating-point tensor"
    elif not want.is_floating_point and (stored.is_floating_point or stored.is_complex):
        kind = "an integer or boolean tensor"
    else:
        return None
    return f"{key} is {_dtype_name(stored)} there but {_dtype_name(want)} ({kind}) in the model"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _value_problem(key: str, value: torch.Tensor, want: torch.Tensor) -> str | None:
    """The line if `value` (read from the source for `key`) cannot fill `want`: another kind of dtype
    (a source whose headers did not tell it), or a non-finite value in a parameter (buffers such as
    attention masks may hold -inf on purpose); else None."""
    wrong = _dtype_problem(key, value.dtype, want.dtype)
    if wrong is not None:
        return wrong
    if not isinstance(want, nn.Parameter) or not (value.is_floating_point() or value.is_complex()):
        return None
    if bool(torch.isfinite(value).all()):
        return None
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    counts = " and ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "inf")) if n)
    return (f"{key} holds {counts} of its {value.numel()} values; expected finite weights (saved from a run "
            f"that diverged, or damaged)")


def _tied_conflict(target: _Target, source: WeightSource, prefix: str | None) -> str | None:
    """A line if `source` holds different values under two names of one tensor the model ties (a
    checkpoint of a model that does not tie them: one of the two would silently win), else None."""
    for group in target.groups:
        keys = list(dict.fromkeys(k for n in group for k in _candidates(n, prefix) if k in source.shapes))
        if len(keys) < 2:
            continue
        values = source.read(keys)
        for k in keys[1:]:
            if not torch.equal(values[keys[0]], values[k]):
                return (f"{source.what} holds different tensors under {keys[0]!r} and {k!r}, which this model "
                        f"ties (one parameter): it was saved from a model that does not tie them")
    return None


def _first_bad_value(target: _Target, source: WeightSource, keys: list[str], reads: dict[str, str]) -> str | None:
    """The line naming the first of `keys` whose values cannot fill the model (`_value_problem`), or None."""
    for i in range(0, len(keys), _READ_BATCH):
        batch = keys[i:i + _READ_BATCH]
        values = source.read(batch)
        for key in batch:
            problem = _value_problem(key, values[key], target.tensors[reads[key]])
            if problem is not None:
                return problem
    return None


def _verdict(what: str, missing: list[str], unexpected: list[str], misshaped: list[str], mistyped: list[str]
             ) -> str | None:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                         ("mis-typed", mistyped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    return f"{what} does not fit the model: " + "; ".join(parts) if parts else None


def load_weights(model: "nn.Module | ParallelModel", source: str | WeightSource | Mapping[str, torch.Tensor], *,
                 base_prefix: str | None = None, ignore_unexpected: Sequence[str] = (),
                 ignore_missing: Sequence[str] = (), check_only: bool = False) -> None:
    """Fill `model` (a whole nn.Module, or this rank's stages of a ParallelModel) from `source` in place.

    `source` is a path (see `open_weights`), an open WeightSource or a state dict of whole tensors.
    For a ParallelModel this is collective over all ranks: each rank reads only its stages' tensors, and
    every rank checks before any copies, so a bad source raises the same WeightsError on every rank
    with no weight changed. A key may lack or carry `base_prefix` (a model's base-model prefix, e.g.
    'model' or 'transformer'); keys matching a regex of `ignore_unexpected` / `ignore_missing` are
    allowed to be extra / absent. Raises WeightsError listing missing, unexpected and mis-shaped keys,
    and tensors of another kind of dtype (int64 for a float32 parameter); WeightValuesError (a
    WeightsError) when only the last are wrong, or when a parameter's values are not all finite (the
    tensors are read once to check that, in bounded batches, and again to copy them).
    `check_only=True` checks (reading no tensor data: dtypes as the headers tell them) and copies nothing.
    """
    from pp.comms.backend import all_gather_object

    distributed = hasattr(model, "stages") and hasattr(model, "local_tensor")
    gather = all_gather_object if distributed else (lambda obj: [obj])
    target = _parallel_target(model) if distributed else _module_target(model)  # type: ignore[arg-type]
    mine = {k for n in target.tensors for k in _candidates(n, base_prefix)}
    error = None
    try:  # a failure on one rank must reach the others, which would otherwise wait in the gather below
        if isinstance(source, Mapping):
            source = WeightSource.from_state_dict(source)
        elif not isinstance(source, WeightSource):
            source = open_weights(source)
    except WeightsError as e:
        error = str(e)
    firsts = gather((sorted(mine), error))
    errors = [e for _, e in firsts if e]
    if errors:
        raise WeightsError(errors[0])
    assert isinstance(source, WeightSource)
    known: set[str] = set().union(*(set(m) for m, _ in firsts))
    reads, missing, misshaped, mistyped = _plan(target, source, base_prefix, ignore_missing)
    unexpected = [k for k in source.shapes if k not in known and not any(re.search(p, k) for p in ignore_unexpected)]
    problems = [sorted({m for p in gather((missing, unexpected, misshaped, mistyped)) for m in p[i]}) for i in range(4)]
    message = _verdict(source.what, *problems)
    if message is not None:
        raise (WeightValuesError if not any(problems[:3]) else WeightsError)(message)
    if check_only:
        return
    tied = gather(_tied_conflict(target, source, base_prefix))   # read both names: the values, not only shapes
    if any(tied):
        raise WeightsError(next(t for t in tied if t))
    keys = list(reads)
    bad = gather(_first_bad_value(target, source, keys, reads))   # all read before any copy: nothing half-loaded
    if any(bad):
        detail = next(b for b in bad if b)
        raise WeightValuesError(f"{source.what}: {detail}", detail)
    for i in range(0, len(keys), _READ_BATCH):   # a bounded number of tensors in host memory at a time
        loaded = source.read(keys[i:i + _READ_BATCH])
        with torch.no_grad():
            for key, t in loaded.items():
                target.copy(reads[key], target.local(reads[key], t))
