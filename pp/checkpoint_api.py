"""`load_unsplit`: load a pp training checkpoint (any pp degree) into the plain, unsplit model."""
from __future__ import annotations

import torch.distributed.checkpoint as dcp
import torch.nn as nn

from .launcher import checkpoint as ckpt

__all__ = ["load_unsplit"]


def load_unsplit(model: nn.Module, path: str, *, strict: bool = True) -> str:
    """Load the weights of checkpoint `path` into `model` in place, in this process alone; return the path used.

    `path` is a `step-<N>` directory, or an output/checkpoints directory (its newest complete checkpoint
    is used). The checkpoint is checked against its manifest first; missing or differently shaped
    parameters raise `CheckpointError` naming them, and so, with `strict` (as in
    `nn.Module.load_state_dict`), do model tensors the checkpoint holds that `model` does not have (a
    checkpoint of another model); `strict=False` loads the tensors `model` has and ignores the rest.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_unsplit needs an nn.Module, got {type(model).__name__}")
    path = ckpt.resolve(str(path))
    state = {"model": model.state_dict()}
    ckpt.check_fits(path, state, strict=strict)
    with ckpt._single_process_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return path
