"""`python -m pp.export RUN_DIR_OR_CHECKPOINT -o OUT_DIR`: a pp checkpoint as safetensors for the ecosystem.

The newest complete checkpoint of a run (or the one named) is written as model.safetensors, sharded with
model.safetensors.index.json above `--max-shard-size`; an `hf:` model also gets its config.json, so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it. For other models the file is a
state dict that the model's `load_state_dict` takes (`safetensors.torch.load_file`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Iterator

import torch

__all__ = ["export", "main"]

INDEX = "model.safetensors.index.json"
DEFAULT_SHARD = 5 * 10**9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says which and why in one line."""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes; ExportError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ExportError(f"--max-shard-size {text!r}: expected a positive size such as 5GB, 500MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _tied_duplicates(model_section: dict) -> set[str]:
    """Names under which an hf model ties a tensor it already has under an earlier name (saved once)."""
    from pp.hf import hf_class

    cls = hf_class(model_section["name"])
    config = cls.config_class.from_dict(model_section["config"])
    with torch.device("meta"):
        model = cls(config)
    first: dict[int, str] = {}
    dups = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            dups.add(name)
    return dups


def _shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Keys in order, grouped so that each group's bytes stay within `limit` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    total = 0
    for key, n in sizes.items():
        if groups[-1] and total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(key)
        total += n
    return groups


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (os.umask sets it to read it,
    which a file another thread creates meanwhile would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _progress(total: int, enabled: bool) -> Iterator:
    """A tqdm bar over bytes when tqdm is installed and the export is large; else a stand-in."""
    class _Quiet:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="B", unit_scale=True, desc="pp.export", file=sys.stderr)
        except ImportError:
            pass
    return _Quiet()


def export(source: str, out_dir: str, max_shard_size: int | str = DEFAULT_SHARD, progress: bool | None = None,
           log: Callable[[str], None] | None = None) -> str:
    """Write checkpoint `source` (a run directory, its checkpoints directory, or a step-<N> directory)
    to `out_dir` as safetensors (+ config.json for hf: models); return the checkpoint path used (the
    newest undamaged one; each newer damaged one is named through `log`, if given).

    The progress bar shows when `progress` is True, or by default for exports above 1 GB.
    Raises ExportError (or CheckpointError) naming what is wrong.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pp.launcher import checkpoint as ckpt

    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    if limit <= 0:
        raise ExportError(f"max_shard_size={max_shard_size!r}: expected a positive number of bytes")
    path = ckpt.resolve(str(source), log)
    manifest = ckpt.read_manifest(path)
    section = manifest.get("model") or {}
    is_hf = str(section.get("name", "")).startswith("hf:")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {k[len("model."):]: m for k, m in meta.items()
               if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not tensors:
        raise ExportError(f"checkpoint {path} holds no model tensors")
    if is_hf:
        for name in _tied_duplicates(section):
            tensors.pop(name, None)
    sizes = {k: m.properties.dtype.itemsize * int(torch.Size(m.size).numel()) for k, m in tensors.items()}
    root = os.path.realpath(path)   # the checkpoint, or the run's checkpoints/ directory holding it
    if os.path.basename(os.path.dirname(root)) == "checkpoints":
        root = os.path.dirname(root)
    if os.path.commonpath([root, os.path.realpath(out_dir)]) == root:
        raise ExportError(f"output {out_dir!r} lies in the checkpoint {root} (pp.run's checkpoints "
                          f"and their rotation); choose a directory outside it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"output {out_dir!r} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:   # a parent that is a file, no permission
        raise ExportError(f"output {out_dir!r} cannot be created: {e.strerror or e}") from None
    groups = _shards(sizes, limit)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for stale in os.listdir(out_dir):  # an earlier export's shards would confuse a reader
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors|" + re.escape(INDEX), stale):
            os.remove(os.path.join(out_dir, stale))
    total = sum(sizes.values())
    bar = _progress(total, progress if progress is not None else total > 10**9)
    weight_map = {}
    try:
        for keys, fname in zip(groups, names):
            state = {k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype) for k in keys}
            with ckpt._single_process_quiet():
                dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
            save_file(state, os.path.join(out_dir, fname), metadata={"format": "pt"})
            os.chmod(os.path.join(out_dir, fname), 0o666 & ~_umask())   # safetensors writes via a 0600 temp file
            weight_map.update({k: fname for k in keys})
            bar.update(sum(sizes[k] for k in keys))
    finally:
        bar.close()
    if len(groups) > 1:
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if is_hf:
        config = dict(section["config"])
        config["architectures"] = [section["name"][len("hf:"):]]
        dtypes = {m.properties.dtype for m in tensors.values() if m.properties.dtype.is_floating_point}
        if len(dtypes) == 1:
            config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pp.export`; returns the exit code (2 for an unusable checkpoint)."""
    from pp.launcher.checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="python -m pp.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run's output.dir (its newest complete checkpoint is used), its checkpoints/ "
                        "directory, or one step-<N> directory")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="directory to write the weights to")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: for exports above 1 GB)")
    args = p.parse_args(argv)
    try:
        path = export(args.source, args.out, args.max_shard_size, args.progress,
                      log=lambda line: print(f"pp.export: {line}", file=sys.stderr))
    except (ExportError, CheckpointError, ValueError) as e:
        print(f"pp.export: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # writing the files (disk full, permissions)
        print(f"pp.export: cannot write to {args.out!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"pp.export: needs safetensors (pip install 'pp[hf]'): {e}", file=sys.stderr)
        return 2
    print(f"pp.export: wrote {path} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
