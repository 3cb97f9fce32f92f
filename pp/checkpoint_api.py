"""`load_unsplit`: load a pp training checkpoint (any pp degree) into the plain, unsplit model."""
from __future__ import annotations

import warnings

import torch

import torch.distributed.checkpoint as dcp
import torch.nn as nn

from .launcher import checkpoint as ckpt
from .weights import _module_target, _pp_checkpoint, _tied_conflict

__all__ = ["load_unsplit"]


def _view_key(t: torch.Tensor) -> tuple:
    """What makes two state-dict entries one tensor: the same memory seen the same way."""
    if t.numel() == 0:          # empty tensors share no memory to speak of
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def load_unsplit(model: nn.Module, path: str, *, strict: bool = True) -> str:
    """Load the weights of checkpoint `path` into `model` in place, in this process alone; return the path used.

    `path` is a `step-<N>` directory, or an output/checkpoints directory (its newest complete checkpoint
    is used; a UserWarning names each newer damaged one passed over). The checkpoint is checked against its manifest first. With `strict` (as in
    `nn.Module.load_state_dict`), `CheckpointError` names what does not fit, before any tensor is
    loaded: a tensor of `model` that the checkpoint lacks or holds in another shape, a model tensor the
    checkpoint holds that `model` does not have, or two tensors `model` ties (one parameter under two
    names) that the checkpoint holds with different values (a checkpoint of an untied model).
    `strict=False` loads the tensors both have and ignores the rest; other shapes are still refused, and of
    two differing tensors under tied names the one `model.state_dict()` lists last wins (as in
    `load_state_dict(strict=False)`). TypeError for a `model` that is not an nn.Module, ValueError for one
    with tensors on the meta device (no storage to load into: `model.to_empty(device=...)` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_unsplit needs an nn.Module, got {type(model).__name__}")
    on_meta = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"load_unsplit: {len(on_meta)} tensor(s) of the model are on the meta device (first: "
                         f"{on_meta[0]!r}) and cannot hold values: call model.to_empty(device='cpu') first")
    path = ckpt.resolve(str(path), lambda line: warnings.warn(line, stacklevel=4))   # names the ones passed over
    state = model.state_dict()
    if not strict:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {n: t for n, t in state.items() if f"model.{n}" in saved}
        # tied names: only the last listed is read (DCP reads in file order, not in the order listed)
        last = {_view_key(t): n for n, t in state.items()}
        state = {n: t for n, t in state.items() if last[_view_key(t)] == n}
    ckpt.check_fits(path, {"model": state}, strict=strict)
    if strict:
        conflict = _tied_conflict(_module_target(model), _pp_checkpoint(path), None)
        if conflict:
            raise ckpt.CheckpointError(conflict)
    with ckpt._single_process_quiet():
        dcp.load({"model": state}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return path
