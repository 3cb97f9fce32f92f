"""torch.distributed.pipelining's names for schedule actions (`_Action`, `_ComputationType` and the
constants F, B, I, W, SEND_F, ...), for code that writes its schedule as torch's test zoo does: a subclass
of `PipelineScheduleMulti` that assigns `self.pipeline_order` (or, on `_PipelineScheduleRuntime`,
`self.pipeline_order_with_comms`) in its constructor. pp reads such lists through their compact text
(``0F1``, ``1SEND_B0``, ``(0F7;7B3)OVERLAP_F_B``), the same text as torch's and as pp's own `Action`, so
torch's own `_Action` objects read too (`cells_as_rows`).
"""
from __future__ import annotations

import enum
from typing import Any, Mapping, NamedTuple, Sequence


class _ComputationType(str, enum.Enum):
    """torch's action kinds, with torch's names and short forms."""

    FORWARD = "F"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"
    UNSHARD = "UNSHARD"
    RESHARD = "RESHARD"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    FULL_BACKWARD = "B"
    OVERLAP_F_B = "OVERLAP_F_B"
    REDUCE_GRAD = "REDUCE_GRAD"

    def __str__(self) -> str:
        return f"_ComputationType.{self.name}"

    @staticmethod
    def from_str(action: str) -> "_ComputationType":
        """The kind for its short form ("F", "B", "I", "W", "SEND_F", ...); ValueError naming it otherwise."""
        try:
            return _ComputationType(action)
        except ValueError:
            raise ValueError(f"invalid computation type {action!r}: expected one of "
                             f"{', '.join(k.value for k in _ComputationType)}") from None


(FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, UNSHARD, RESHARD, SEND_F, RECV_F, SEND_B, RECV_B, FULL_BACKWARD,
 OVERLAP_F_B, REDUCE_GRAD) = _ComputationType   # torch's module-level names, in the enum's order
F, I, W, B = FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FULL_BACKWARD   # noqa: E741 - torch's short names


class _Action(NamedTuple):
    """One cell of a schedule as torch writes it: `computation_type` of stage `stage_index` on microbatch
    `microbatch_index` (None for UNSHARD / RESHARD / REDUCE_GRAD); an OVERLAP_F_B cell holds its forward
    and backward in `sub_actions`. `repr` is the compact text, e.g. ``2F5``."""

    stage_index: int
    computation_type: _ComputationType
    microbatch_index: int | None = None
    sub_actions: tuple["_Action", ...] | None = None

    def __repr__(self) -> str:
        kind = _ComputationType(self.computation_type).value
        if self.sub_actions is not None:
            return f"({';'.join(repr(a) for a in self.sub_actions)}){kind}"
        mb = "" if self.microbatch_index is None else str(self.microbatch_index)
        return f"{self.stage_index}{kind}{mb}"

    def __str__(self) -> str:
        return repr(self)

    @staticmethod
    def from_str(action_string: str) -> "_Action":
        """Read the compact text (``"2F5"``, ``"0SEND_B1"``, ``"(0F7;7B3)OVERLAP_F_B"``); ValueError naming
        the text otherwise."""
        from .actions import Compound, Action

        text = action_string.strip()
        if text.startswith("("):
            cell = Compound.parse(text)
            return _Action(cell.sub_actions[0].stage, OVERLAP_F_B, None,
                           tuple(_Action(a.stage, _ComputationType(a.kind.value), a.microbatch)
                                 for a in cell.sub_actions))
        for kind in (UNSHARD, RESHARD, REDUCE_GRAD):
            if text.endswith(kind.value) and text[:-len(kind.value)].isdigit():
                return _Action(int(text[:-len(kind.value)]), kind)
        a = Action.parse(text)
        return _Action(a.stage, _ComputationType(a.kind.value), a.microbatch)


def cells_as_rows(lists: Any) -> dict[int, list[Any]]:
    """`{rank: [cell, ...]}` as assigned to `pipeline_order` / `pipeline_order_with_comms`, each cell as
    pp's csv reader takes it: None (a bubble), pp's own Action, or the compact text of anything else
    torch-like (torch's `_Action` or this module's). ValueError for what is not such a dict."""

    if not isinstance(lists, Mapping):
        raise ValueError(f"expected a dict of rank -> list of actions (None for a bubble), got "
                         f"{type(lists).__name__}")
    rows: dict[int, list[Any]] = {}
    for rank, cells in lists.items():
        if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence):
            raise ValueError(f"rank {rank!r}: expected a list of actions (None for a bubble), got {cells!r}")
        rows[rank] = [_as_cell(c, rank, column) for column, c in enumerate(cells)]
    return rows


def _as_cell(c: Any, rank: Any, column: int) -> Any:
    from .actions import Action, Compound

    if c is None or isinstance(c, (Action, Compound, str)) or not hasattr(c, "computation_type"):
        return c   # read (or refused, naming the place) by pp's csv reader
    where = f"rank {rank}, column {column + 1}"
    kind = getattr(c.computation_type, "name", c.computation_type)
    shown = f"{type(c).__name__}({getattr(c, 'stage_index', '?')!r}, {kind!s}, {getattr(c, 'microbatch_index', None)!r})"
    whole_stage = str(getattr(c.computation_type, "value", c.computation_type)) in (
        "UNSHARD", "RESHARD", "REDUCE_GRAD", "OVERLAP_F_B")   # the kinds that name no microbatch
    for field, none_ok in (("stage_index", False), ("microbatch_index", whole_stage)):
        value = getattr(c, field, None)
        if (value is None and none_ok) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            continue
        raise ValueError(f"{where}: {shown} has {field}={value!r}: expected an integer >= 0")
    try:
        return repr(c)
    except ValueError:   # a computation_type that is none (torch <= 2.4's argument order, a typo)
        raise ValueError(f"{where}: {shown} has computation_type={c.computation_type!r}: expected one of "
                         f"{', '.join(k.value for k in _ComputationType)}") from None
