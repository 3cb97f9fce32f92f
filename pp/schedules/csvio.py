"""Read and write action lists as CSV (one row per rank, one action per cell, e.g. ``0F0,0SEND_F0,...``)
or take them from plain Python rows, so users can write their own schedules.

torch.distributed.pipelining's files read as they are: a blank cell is a bubble, a compound cell such as
``(0F7;7B3)OVERLAP_F_B`` runs its actions one after another, and UNSHARD / RESHARD / REDUCE_GRAD cells
are skipped (pp does that work in its data-parallel hooks)."""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pp.schedules.actions import IGNORED_CELLS, Action, Compound

Cell = Action | Compound | None
_SKIP = object()
_IGNORED = re.compile(r"^\s*\d*\s*(" + "|".join(sorted(IGNORED_CELLS)) + r")\s*\d*\s*$")


def _at(row: int, column: int, numbered: bool) -> str:
    """Where a cell is: its rank and column, and its row where the source has rows (a file or a list)."""
    return f"rank {row}" + (f" (row {row + 1})" if numbered else "") + f", column {column + 1}"


def _cell(text: Any, row: int, column: int, where: str, numbered: bool) -> Any:
    """One cell as an Action or Compound; None for a blank cell (a bubble), _SKIP for a cell pp does not
    run. Errors name the row, the column and the text."""
    if isinstance(text, (Action, Compound)) or text is None:
        return text
    if hasattr(text, "computation_type"):   # torch's _Action (or pp.schedules'): read as pipeline_order does
        from .torch_actions import _as_cell
        text = _as_cell(text, row, column)
    if not isinstance(text, str):
        raise ValueError(f"{where}{_at(row, column, numbered)}: expected an action string such as '0F0', "
                         f"got {text!r}")
    if not text.strip():
        return None
    if _IGNORED.match(text):
        return _SKIP
    try:
        return Compound.parse(text) if text.strip().startswith("(") else Action.parse(text)
    except ValueError as err:   # the parser's message names the text and what it expected
        raise ValueError(f"{where}{_at(row, column, numbered)}: {err}") from None


def _row(rank: int, cells: Any, where: str, numbered: bool = True) -> list[Cell]:
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Sequence):
        row = f" (row {rank + 1})" if numbered else ""
        raise ValueError(f"{where}rank {rank}{row}: expected a list of action strings, got {cells!r}")
    return [a for c, text in enumerate(cells) if (a := _cell(text, rank, c, where, numbered)) is not _SKIP]


def read_rows(source: str | Path | Mapping[int, Sequence[Any]] | Sequence[Sequence[Any]]) -> dict[int, list[Cell]]:
    """The rows as written, per rank: Action, Compound, or None for a blank cell (a bubble). Sources as
    in `read_actions`."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
        except OSError as err:
            raise ValueError(f"cannot read schedule CSV {str(path)!r}: {err.strerror or err}") from None
        return {r: _row(r, cells, f"{path}: ") for r, cells in enumerate(rows)}
    if isinstance(source, Mapping):
        for rank in source:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                raise ValueError(f"action lists are keyed by rank numbers >= 0, got key {rank!r}")
        return {r: _row(r, source[r], "", numbered=False) for r in sorted(source)}
    if isinstance(source, Sequence):
        return {r: _row(r, cells, "") for r, cells in enumerate(source)}
    raise ValueError(f"cannot read action lists from {type(source).__name__}: "
                     f"expected a CSV path, a dict or a list of rows")


def flatten(rows: Mapping[int, Sequence[Cell]]) -> dict[int, list[Action]]:
    """What each rank runs, in order: bubbles dropped, compound cells expanded in the order written."""
    out: dict[int, list[Action]] = {}
    for r, cells in rows.items():
        acts: list[Action] = []
        for c in cells:
            if isinstance(c, Compound):
                acts.extend(c.sub_actions)
            elif c is not None:
                acts.append(c)
        out[r] = acts
    return out


def read_actions(source: str | Path | Mapping[int, Sequence[Any]] | Sequence[Sequence[Any]]) -> dict[int, list[Action]]:
    """Action lists per rank from a CSV file (row r = rank r, blank cells ignored), from
    ``{rank: ["0F0", ...]}`` or from ``[["0F0", ...], ...]``. Compound cells are expanded (see `flatten`).
    Errors name the rank, the row and column (counting from 1, as a spreadsheet does) and the text of the
    bad cell."""
    return flatten(read_rows(source))


def write_actions(lists: Mapping[int, Sequence[Cell]], path: str | Path) -> None:
    """Write one row per rank (0 up to the highest rank; a missing rank is an empty row); None is a
    blank cell, so a schedule's `pipeline_order` writes the file torch would."""
    n_rows = max(lists, default=-1) + 1
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        for r in range(n_rows):
            writer.writerow(["" if a is None else str(a) for a in lists.get(r, ())])
