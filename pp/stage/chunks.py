"""torch.distributed.pipelining's per-microbatch stage methods on pp's `PipelineStage`.

pp's executor runs every forward, backward (B or its input half I) and weight-gradient action (W) through
`forward_one_chunk`, `backward_one_chunk` and `backward_weight_one_chunk`, as torch's runtime does, so
a stage subclass that overrides one of them (to wrap it: prefetch, log, add a dependency, change the
microbatch's inputs) runs under every pp schedule, and code calling them by hand keeps working.
"""
from __future__ import annotations

import inspect
import warnings

from typing import Any

import torch
import torch.utils._pytree as pytree

from .compiled import inner_module
from .outputs import positional


def _to_device(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


class ChunkMethods:
    """The chunk methods of `PipelineStage` (a mixin over its `forward_one`, `backward_one`,
    `backward_input`, `backward_weight`, `set_model_inputs` and per-microbatch state)."""

    stage_index: int
    is_first: bool
    is_last: bool
    has_backward: bool
    _keyword_params: tuple | None = None   # (_forward_keywords), read once per stage
    _warned_keywords = False

    def forward_one_chunk(self, fwd_chunk_id: int, args: tuple = (), kwargs: dict | None = None,
                          save_forward_output: bool = True) -> Any:
        """Forward of microbatch `fwd_chunk_id` (torch's method and signature).

        `args` / `kwargs`: the microbatch's model inputs. The first stage reads both; a later stage takes
        what its producers sent as its positional inputs and, where it is a manual stage (a module of
        yours), the keywords of `kwargs` its forward takes (torch gives a stage the keywords of the
        step() call on its rank). `save_forward_output` is taken for torch's
        signature: which outputs a step returns is `step(return_outputs=...)`'s business in pp.
        Returns the stage's output: on the last stage the model's output for the microbatch (the value
        the schedule's loss_fn reads), elsewhere what the stage's module returned.
        """
        if self.is_first:
            if not isinstance(args, (tuple, list)):
                args = (args,)
            kwargs = dict(kwargs or {})
            if kwargs and self.pipe_info is None:   # those of its rank's keywords it takes (another stage of
                taken = self._forward_keywords()[0]   # the rank may take the others: step() checked so)
                kwargs = {k: v for k, v in kwargs.items() if taken is None or k in taken}
            self.set_model_inputs(fwd_chunk_id, tuple(args), kwargs)
        elif self.pipe_info is None:
            self.set_stage_keywords(fwd_chunk_id, kwargs or {})
        out = self.forward_one(fwd_chunk_id)
        return self.state(fwd_chunk_id).final if self.is_last else out

    def set_stage_keywords(self, fwd_chunk_id: int, kwargs: dict) -> None:
        """A later manual stage's keywords for microbatch `fwd_chunk_id`: those of `kwargs` (one
        microbatch's share of its rank's step() keywords) that its module's forward takes by name, all of
        them where it takes `**kwargs`, less those it is given positionally by what it received. Warns
        once per stage where its forward has keyword parameters that default to None and this rank's
        step() gave it no keyword (a mask the first rank was given and this one not runs as None, without
        a word in torch)."""
        taken, named = self._forward_keywords()
        st = self.state(fwd_chunk_id)
        if kwargs or not self._warned_keywords:
            filled = {n for n, _ in named[:len(positional(st.inputs))]}   # given by what the stage received
        st.kwargs = {k: _to_device(v, self.device) for k, v in kwargs.items()
                     if (taken is None or k in taken) and k not in filled} if kwargs else {}
        if named and not self._warned_keywords:
            self._warned_keywords = True
            missing = [n for n, is_none in named if is_none and n not in filled and n not in kwargs]
            if missing and not kwargs:
                warnings.warn(f"pp: stage {self.stage_index}'s forward takes {missing} (default None), which "
                              f"step() on this rank was not given: they are None for every microbatch. As in "
                              f"torch, a stage gets the keywords of the step() call on its own rank: pass them "
                              f"there too if the stage needs them", stacklevel=2)

    def _forward_keywords(self) -> tuple[set | None, list[tuple[str, bool]]]:
        """(the keywords the stage module's forward takes, None for all; (name, defaults to None) for
        each of its parameters that may be given by name, in order), read once."""
        if self._keyword_params is None:
            try:
                params = inspect.signature(inner_module(self.submod).forward).parameters.values()
            except (TypeError, ValueError):
                params = ()
            named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            taken = None if not params or any(p.kind == p.VAR_KEYWORD for p in params) else {p.name for p in named}
            self._keyword_params = (taken, [(p.name, p.default is None) for p in named])
        return self._keyword_params

    def backward_one_chunk(self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True,
                           last_backward: bool = False) -> None:
        """Backward of microbatch `bwd_chunk_id` (torch's method and signature): the whole backward (B),
        or with `full_backward=False` its input-gradient half (I), the weight gradients then left to
        `backward_weight_one_chunk`.

        `loss` (last stage only): the tensor to backpropagate, the schedule's loss of the microbatch
        unless a subclass passes another; seeded with the microbatch's share of the step's loss (pp's
        loss scaling). `last_backward` is taken for torch's signature: pp starts a data-parallel
        gradient sync after each stage's last backward of the step itself (pp/parallel/wrapped.py).
        Does nothing when the step runs no backward (`has_backward` False, as torch). Raises
        RuntimeError for a microbatch whose forward has not run on this stage, ValueError for a loss
        given to a stage other than the last.
        """
        if not self.has_backward:
            return
        st = self._mb.get(bwd_chunk_id)
        if st is None or not (st.outputs or st.loss is not None):
            raise RuntimeError(f"stage {self.stage_index}: backward_one_chunk({bwd_chunk_id}) without a pending "
                               f"forward of microbatch {bwd_chunk_id} (forward_one_chunk runs first, and "
                               f"backward once per forward)")
        if loss is not None:
            if not self.is_last:
                raise ValueError(f"backward_one_chunk: stage {self.stage_index} is not the last stage; only the "
                                 f"last stage backpropagates a loss (the others take their outputs' gradients)")
            st.loss = loss
        if full_backward:
            self.backward_one(bwd_chunk_id, st.scale)
        else:
            self.backward_input(bwd_chunk_id, st.scale)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        """Weight-gradient half (W) of microbatch `bwd_chunk_id`, after its
        `backward_one_chunk(..., full_backward=False)` (torch's method and signature; `last_backward` as
        in `backward_one_chunk`). Does nothing when the step runs no backward."""
        if not self.has_backward:
            return
        self.backward_weight(bwd_chunk_id)

    def _no_p2p_ops(self, name: str) -> list:
        raise NotImplementedError(
            f"PipelineStage.{name}: pp posts a stage's transfers itself, from the schedule's action lists, so it "
            f"hands out no P2P ops for a loop of your own; write the order as lists (pipeline_order, load_csv: "
            f"docs/schedules.md), or register custom functions for F/B/I/W (register_custom_function)")

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list:
        """Not provided (NotImplementedError): see `_no_p2p_ops`."""
        return self._no_p2p_ops("get_fwd_recv_ops")

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
        """Not provided (NotImplementedError): see `_no_p2p_ops`."""
        return self._no_p2p_ops("get_fwd_send_ops")

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list:
        """Not provided (NotImplementedError): see `_no_p2p_ops`."""
        return self._no_p2p_ops("get_bwd_recv_ops")

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
        """Not provided (NotImplementedError): see `_no_p2p_ops`."""
        return self._no_p2p_ops("get_bwd_send_ops")
