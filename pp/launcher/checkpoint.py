"""Checkpoints with torch.distributed.checkpoint, under the model's original parameter names.

Layout: `<root>/step-<N>/` holds DCP's files plus `manifest.json` (step, sizes and sha256 of every file,
the config it came from). A save writes `<root>/.tmp-step-<N>/` and renames it into place only when
every rank's files and the manifest are on disk, so a crash mid-save leaves the previous checkpoint
as it was. Loading checks the manifest (and the checksums) first and skips a damaged checkpoint.
State keys: `model.<fqn>` and `optim.<fqn>.<exp_avg|exp_avg_sq|step>`, the same for any pp degree, so a
checkpoint saved with pp=4 loads with pp=2 or into the unsplit model (`pp.load_unsplit`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from . import collectives as coll

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and says why in one line."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step}")


def list_steps(root: str) -> list[int]:
    """Steps of the `step-<N>` directories under `root`, newest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return sorted(steps, reverse=True)


# --- state dicts keyed by fully qualified parameter names ----------------------------------------

def optimizer_state(named_params: Iterable[tuple[str, torch.nn.Parameter]], optim: torch.optim.Optimizer) -> dict:
    """{fqn: {state name: tensor}} for every parameter; empty state is created first (AdamW layout; the
    step count on the parameter's device for a fused or capturable optimizer, as torch keeps it)."""
    on_device = any(g.get("fused") or g.get("capturable") for g in optim.param_groups)
    out = {}
    for fqn, p in named_params:
        st = optim.state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if on_device else "cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        out[fqn] = {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
    return out


# --- save ----------------------------------------------------------------------------------------

def save(root: str, step: int, state: dict, meta: dict, *, verify: bool = True, keep: int = 0) -> str:
    """Collective: write `state` ({"model": ..., "optim": ...}) as `<root>/step-<step>`; return that path.

    Every rank passes its own part; keys several ranks hold (shared weights) are written once.
    """
    rank, world = coll.rank(), coll.world_size()
    tmp = os.path.join(root, f".tmp-step-{step}")
    final = step_dir(root, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    coll.barrier()
    with _single_process_quiet():
        try:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not coll.active())
        except BaseException as e:   # Ctrl-C while writing: DCP wraps it (in a BaseException); pp.run ends on it as on any Ctrl-C
            if any(isinstance(f, KeyboardInterrupt) for f in (getattr(e, "failures", None) or {}).values()):
                raise KeyboardInterrupt from None
            raise
    coll.barrier()
    names = sorted(n for n in os.listdir(tmp) if not n.startswith("."))
    names.append(".metadata")
    mine = {n: _file_record(os.path.join(tmp, n), verify) for i, n in enumerate(names) if i % world == rank}
    files: dict = {}
    for part in coll.all_gather_object(mine):
        files.update(part)
    if rank == 0:
        manifest = {"format": FORMAT_VERSION, "step": step, "saved_at": time.time(), "world_size": world,
                    "files": dict(sorted(files.items())), **meta}
        _write_json_durably(os.path.join(tmp, MANIFEST), manifest)
        _replace_dir(tmp, final)
        if keep > 0:   # the newest `keep` with a manifest: a damaged directory never counts as a kept one
            complete = [s for s in list_steps(root) if os.path.isfile(os.path.join(step_dir(root, s), MANIFEST))]
            for old in complete[keep:]:
                shutil.rmtree(step_dir(root, old), ignore_errors=True)
    coll.barrier()
    return final


def remove_checkpoints(root: str) -> list[int]:
    """Delete every `step-<N>` checkpoint under `root`; return their steps."""
    steps = list_steps(root)
    for step in steps:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)
    return steps


def set_aside_damaged(root: str, above: int = -1) -> list[str]:
    """Rename every `step-<N>` under `root` with N > `above` to `damaged-step-<N>` (never read, never
    counted by `keep`, never removed by pp; a name taken already gets a numbered suffix); return the new
    names. Resume calls it for the checkpoints it found damaged: those newer than the one it loads."""
    names = []
    for step in [s for s in list_steps(root) if s > above]:
        new, i = f"damaged-step-{step}", 1
        while os.path.exists(os.path.join(root, new)):
            new, i = f"damaged-step-{step}.{i}", i + 1
        os.rename(step_dir(root, step), os.path.join(root, new))
        names.append(new)
    return names


def remove_partial_saves(root: str) -> list[str]:
    """Delete `.tmp-step-*` leftovers of saves that never finished; return their names."""
    if not os.path.isdir(root):
        return []
    gone = [n for n in os.listdir(root) if n.startswith(".tmp-step-") or n.startswith(".old-step-")]
    for n in gone:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return gone


def _file_record(path: str, checksum: bool) -> dict:
    rec: dict[str, Any] = {"size": os.path.getsize(path)}
    if checksum:
        rec["sha256"] = _sha256(path)
    return rec


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_json_durably(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(src: str, dst: str) -> None:
    """Move `src` to `dst` (a re-saved step replaces the old one) and make the rename durable."""
    old = None
    if os.path.exists(dst):
        old = os.path.join(os.path.dirname(dst), ".old-" + os.path.basename(dst))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    fd = os.open(os.path.dirname(dst) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- check and choose ----------------------------------------------------------------------------

def read_manifest(path: str) -> dict:
    """The manifest of checkpoint `path`, or CheckpointError if it is missing or unreadable."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its {MANIFEST} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or "files" not in manifest:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a pp checkpoint manifest "
                              f"(format {FORMAT_VERSION})")
    return manifest


def problem(path: str, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why checkpoint `path` cannot be used, or None; checksums only of this rank's `share` (rank, world).

    Damaged: no readable manifest; a manifest whose step is not the directory's N (a copied or renamed
    checkpoint would resume at the wrong step); a file the manifest lists missing, of another size or
    checksum; DCP metadata that cannot be read, or that names a file the manifest does not list or
    places data beyond a file's end."""
    try:
        manifest = read_manifest(path)
        files, step = manifest["files"], manifest.get("step")
        if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("size"), int)
                                                  for r in files.values()):
            return f"its {MANIFEST} lists its files in an unknown form (expected name: {{size, sha256}})"
        named = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return f"its {MANIFEST} gives no step (got {step!r})"
        if named and int(named.group(1)) != step:
            return f"its {MANIFEST} is of step {step}, not {named.group(1)} (a copied or renamed checkpoint)"
        for i, (name, rec) in enumerate(sorted(files.items())):
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                return f"file {name} is missing"
            if os.path.getsize(fpath) != rec["size"]:
                return f"file {name} has {os.path.getsize(fpath)} bytes, the manifest says {rec['size']}"
            if "sha256" in rec and i % share[1] == share[0] and _sha256(fpath) != rec["sha256"]:
                return f"file {name} does not match its sha256 checksum"
        if ".metadata" not in files:
            return f"its {MANIFEST} does not list DCP's .metadata"
        ends: dict[str, int] = {}
        for info in dcp.FileSystemReader(path).read_metadata().storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(ends.items()):
            if name not in files:
                return f"file {name}, which its DCP metadata names, is not in its {MANIFEST}"
            if os.path.getsize(os.path.join(path, name)) < end:
                return f"file {name} ends before the data its DCP metadata places in it"
    except CheckpointError as e:
        return str(e).split(": ", 1)[-1] if str(e).startswith(f"checkpoint {path}") else str(e)
    except Exception as e:  # noqa: BLE001 - any failure to read the metadata means "damaged"
        return f"its DCP metadata cannot be read ({type(e).__name__}: {e})"
    return None


def find_latest(root: str, log: Callable[[str], None] = print) -> str | None:
    """Collective: the newest complete, undamaged checkpoint under `root`, or None.

    Ranks share the checksum work; each damaged checkpoint is named through `log` (rank 0) and skipped.
    """
    share = (coll.rank(), coll.world_size())
    for step in list_steps(root):
        path = step_dir(root, step)
        reasons = [r for r in coll.all_gather_object(problem(path, share)) if r]
        if not reasons:
            return path
        if coll.rank() == 0:
            log(f"checkpoint {path} is damaged ({reasons[0]}); skipping it")
    return None


def _missing(path: str) -> str:
    """The message for a checkpoint `path` that does not exist, naming the step directories beside it."""
    there = [f"step-{s}" for s in list_steps(os.path.dirname(os.path.normpath(path)))]
    return f"checkpoint path {path} does not exist" + (
        f" (there: {', '.join(there[:5])}{', ...' if len(there) > 5 else ''})" if there else "")


def resolve(path: str, log: Callable[[str], None] | None = None) -> str:
    """A checked checkpoint directory from `path`: itself, or the newest undamaged one under path or
    path/checkpoints (each newer damaged one named through `log`, if given, as resume names them);
    CheckpointError saying why otherwise."""
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))) or os.path.isfile(os.path.join(path, MANIFEST)):
        if not os.path.exists(path):
            raise CheckpointError(_missing(path))
        why = problem(path)
        if why is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {why}")
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        for step in list_steps(root):
            why = problem(step_dir(root, step))
            if why is None:
                return step_dir(root, step)
            if log is not None:
                log(f"checkpoint {step_dir(root, step)} is damaged ({why}); skipping it")
    if not os.path.exists(path):
        raise CheckpointError(_missing(path))
    raise CheckpointError(f"no complete checkpoint at {path} (expected step-<N>/{MANIFEST} there or under checkpoints/)")


# --- load ----------------------------------------------------------------------------------------

def check_fits(path: str, state: dict, *, strict: bool = True) -> None:
    """CheckpointError naming the first key of `state` that the checkpoint lacks or holds in another shape;
    with `strict`, also the model tensors the checkpoint holds that `state` does not (a checkpoint of
    another model: more layers, other names), as `load_state_dict(strict=True)` refuses them."""
    error = _fit_error(path, state)
    if error is None and strict:
        error = _unexpected_error(path, {k for k, _ in _flatten(state)})
    if error is not None:
        raise CheckpointError(error)


def _fit_error(path: str, state: dict) -> str | None:
    """The line naming the first key of `state` the checkpoint lacks or holds in another shape, or None."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for key, t in _flatten(state):
        meta = saved.get(key)
        if meta is None:
            hint = " (saved from a different model?)" if key.startswith("model.") else ""
            return f"checkpoint {path} has no entry {key!r}{hint}"
        if isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(t.shape):
            return f"checkpoint {path}: {key!r} has shape {tuple(meta.size)} there but {tuple(t.shape)} in this model"
    return None


def _unexpected_error(path: str, keys: set[str]) -> str | None:
    """The line naming the model tensors checkpoint `path` holds that are not among `keys`, or None."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    extra = sorted(k for k in saved if k.startswith("model.") and k not in keys)
    if not extra:
        return None
    names = ", ".join(repr(k.removeprefix("model.")) for k in extra[:3]) + (", ..." if len(extra) > 3 else "")
    return (f"checkpoint {path} holds {len(extra)} model tensor(s) this model does not have ({names}): it was "
            f"saved from a different model (compare the model section of its manifest.json with this config)")


def _resolved(model: dict) -> dict:
    """The model section with a built-in model's `d_ff: 0` written as the width it means (4 * d_model)."""
    if model.get("name") in ("gpt", "mlp") and model.get("d_ff") == 0 and isinstance(model.get("d_model"), int):
        return {**model, "d_ff": 4 * model["d_model"]}
    return model


def check_same_model(path: str, saved: dict | None, current: dict) -> None:
    """CheckpointError unless the model section `saved` with checkpoint `path` (its manifest's `model`)
    describes the model of `current` (this run's model section): tensors alone do not tell every change
    (`n_heads`, `tie_weights` keep every shape). `init_from` does not count, nor an hf model's `seq_len`
    (the training length, not its architecture). Nothing is checked when the manifest has no model."""
    if not isinstance(saved, dict):
        return
    current = _resolved(json.loads(json.dumps(current, default=str)))   # as the manifest holds it (lists)
    saved = _resolved(saved)
    skip = {"init_from"} | ({"seq_len"} if str(current.get("name", "")).startswith("hf:") else set())
    diffs = _differences("model", {k: v for k, v in saved.items() if k not in skip},
                         {k: v for k, v in current.items() if k not in skip})
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise CheckpointError(f"checkpoint {path} was saved for another model ({shown}): resume it with "
                              f"the model it was saved for")


def check_same_tokenizer(path: str, saved: dict | str | None, current: dict | str | None) -> None:
    """CheckpointError unless the data's token ids mean the same tokens as when checkpoint `path` was saved:
    `saved` (its manifest's `tokenizer`) and `current` are {path, sha256} of a tokenizer.json, "bytes", or
    None where not known (token files, an older manifest: nothing is checked). Tokenizers are compared by
    content, so the same file moved is the same tokenizer."""
    if saved is None or current is None or _ids_key(saved) == _ids_key(current):
        return
    raise CheckpointError(f"checkpoint {path} was trained on {_token_ids(saved)} but this run reads "
                          f"{_token_ids(current)}: the token ids would mean other tokens to the model's "
                          f"embedding; resume with the tokenizer it was saved with (or start a new run from "
                          f"it with model.init_from)")


def _ids_key(record: dict | str) -> str | None:
    """What decides the meaning of the ids: a tokenizer's content hash, or "bytes"."""
    return record.get("sha256") if isinstance(record, dict) else record


def _token_ids(record: dict | str) -> str:
    if isinstance(record, dict):
        return f"the ids of train.tokenizer {record.get('path')!r} (sha256 {str(record.get('sha256'))[:12]})"
    return "byte ids (no train.tokenizer)" if record == "bytes" else repr(record)


def _differences(prefix: str, saved: Any, current: Any) -> list[str]:
    """'key=saved there, current here' for each leaf where two config mappings differ (nested mappings,
    such as an hf model's config, by their own keys: the differing ones, not the whole mapping)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current), key=lambda k: (k != "name", str(k)))
                for d in _differences(f"{prefix}.{k}", saved.get(k), current.get(k))]
    return [] if saved == current else [f"{prefix}={_short(saved)} there, {_short(current)} here"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load(path: str, state: dict) -> None:
    """Collective when distributed: fill the tensors of `state` (this rank's part of the model and
    optimizer) in place from checkpoint `path`. Every rank checks its part first and the ranks agree, so
    that a part missing from the checkpoint, or a checkpoint holding model tensors no rank's part has,
    raises the same CheckpointError on every rank before any tensor is read."""
    error = _fit_error(path, state)
    keys = [k for k, _ in _flatten(state) if k.startswith("model.")]
    everyone = coll.all_gather_object((error, keys)) if coll.active() else [(error, keys)]
    errors = [e for e, _ in everyone if e is not None]
    if not errors:
        errors = [e for e in [_unexpected_error(path, {k for _, ks in everyone for k in ks})] if e]
    if errors:
        raise CheckpointError(errors[0])
    with _single_process_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not coll.active())


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it works in one process when there is no group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flatten(state: dict, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        elif isinstance(v, torch.Tensor):
            yield key, v
