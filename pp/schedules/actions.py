"""Typed schedule actions: what one rank does next, as data shared by generators, executor and tools.

`str(action)` is the compact form used in tests, logs and CSV files: ``2F5`` is the forward of stage 2
on microbatch 5, ``0SEND_F3`` sends stage 0's outputs for microbatch 3 to every consumer stage on another
rank, and ``0SEND_F3:2`` only the part that goes to stage 2 (``peer``): per-peer actions are needed where
a stage talks to several remote stages at different times (skip connections).
"""
from __future__ import annotations

import enum
import re
from typing import NamedTuple


class Kind(str, enum.Enum):
    F = "F"            # forward of one microbatch through one stage
    B = "B"            # full backward (input grads and weight grads together)
    I = "I"            # backward for input grads only (zero-bubble schedules)
    W = "W"            # backward for weight grads only, after the matching I
    SEND_F = "SEND_F"  # send the stage's forward outputs to consumer stages on other ranks
    RECV_F = "RECV_F"  # receive the stage's forward inputs from producer stages on other ranks
    SEND_B = "SEND_B"  # send the gradients of the stage's inputs back to their producers
    RECV_B = "RECV_B"  # receive the gradients of the stage's outputs from their consumers

    def __str__(self) -> str:
        return self.value


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})

_PATTERN = re.compile(r"^\s*(\d+)\s*(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)\s*(\d+)\s*(?::\s*(\d+))?\s*$")


class Action(NamedTuple):
    """One step of one rank: `kind` applied to `stage` for `microbatch`."""

    stage: int
    kind: Kind
    microbatch: int
    peer: int | None = None  # comm only: the one remote stage this message goes to / comes from

    def __str__(self) -> str:
        tail = "" if self.peer is None else f":{self.peer}"
        return f"{self.stage}{self.kind.value}{self.microbatch}{tail}"

    def __repr__(self) -> str:
        return str(self)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    @staticmethod
    def parse(text: str) -> "Action":
        """Read the compact form (``"2F5"``, ``"0RECV_B3"``); raise ValueError naming the text otherwise."""
        m = _PATTERN.match(str(text))
        if m is None:
            raise ValueError(
                f"cannot read schedule action {text!r}: expected <stage><kind><microbatch> such as '0F0', "
                f"'1B3' or '2SEND_F1' (optionally ':<peer stage>' on send/recv), with kind one of {', '.join(k.value for k in Kind)}"
            )
        kind = Kind(m.group(2))
        peer = None if m.group(4) is None else int(m.group(4))
        if peer is not None and kind in COMPUTE_KINDS:
            raise ValueError(f"cannot read schedule action {text!r}: only send/recv actions take a ':peer' stage")
        return Action(int(m.group(1)), kind, int(m.group(3)), peer)


class Compound(NamedTuple):
    """A cell of torch's schedule CSV that holds several actions, e.g. ``(0F7;7B3)OVERLAP_F_B``: a forward
    and a backward meant to overlap. pp runs its `sub_actions` one after another in the order written
    (the forward, then the backward: they touch different microbatches, so any order gives the same
    numbers); it appears as one entry in a schedule's `pipeline_order`."""

    sub_actions: tuple[Action, ...]
    kind: str = "OVERLAP_F_B"

    def __str__(self) -> str:
        return f"({';'.join(str(a) for a in self.sub_actions)}){self.kind}"

    def __repr__(self) -> str:
        return str(self)

    @property
    def is_compute(self) -> bool:
        return True

    @property
    def is_comm(self) -> bool:
        return False

    @staticmethod
    def parse(text: str) -> "Compound":
        """Read ``(<action>;<action>...)OVERLAP_F_B``; ValueError naming the text otherwise."""
        m = _COMPOUND.match(str(text))
        if m is None:
            raise ValueError(f"cannot read compound schedule cell {text!r}: expected "
                             f"'(<action>;<action>)OVERLAP_F_B' such as '(0F7;7B3)OVERLAP_F_B'")
        subs = tuple(Action.parse(part) for part in m.group(1).split(";") if part.strip())
        if not subs or any(not a.is_compute for a in subs):
            raise ValueError(f"cannot read compound schedule cell {text!r}: it must hold compute actions "
                             f"(F, B, I, W) only")
        return Compound(subs, m.group(2))


_COMPOUND = re.compile(r"^\s*\(([^()]*)\)\s*(OVERLAP_F_B)\s*$")

# Cells of torch's CSV files that pp has no action for, because it does their work elsewhere: FSDP's
# unshard/reshard and the gradient reduction after a stage's last backward (pp's data-parallel hooks).
IGNORED_CELLS = frozenset({"UNSHARD", "RESHARD", "REDUCE_GRAD"})


def F(stage: int, mb: int) -> Action:
    return Action(stage, Kind.F, mb)


def B(stage: int, mb: int) -> Action:
    return Action(stage, Kind.B, mb)


def I(stage: int, mb: int) -> Action:  # noqa: E743 - the paper's name for the input-grad step
    return Action(stage, Kind.I, mb)


def W(stage: int, mb: int) -> Action:
    return Action(stage, Kind.W, mb)


def last_backward_actions(actions: list[Action]) -> dict[Action, int]:
    """{the last B or W of each stage in `actions`: that stage}."""
    last: dict[int, Action] = {}
    for a in actions:
        if a.kind in (Kind.B, Kind.W):
            last[a.stage] = a
    return {a: s for s, a in last.items()}


def in_flight_peak(actions: list[Action], stage: int) -> int:
    """The most microbatches of `stage` between their forward and their backward at once in `actions`."""
    live = peak = 0
    for a in actions:
        if a.stage == stage and a.kind == Kind.F:
            live += 1
            peak = max(peak, live)
        elif a.stage == stage and a.kind in (Kind.B, Kind.W):
            live -= 1
    return max(peak, 1)
