"""Schedules from lists the user wrote, as torch.distributed.pipelining's code writes them: assigning
`pipeline_order` / `pipeline_order_with_comms` (torch's test zoo), `_load_csv`, and torch's helper names
around them. A mixin of the schedule base class: `_rebuild` builds the schedule again from new lists."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .actions import Action
from .csvio import flatten, read_rows
from .torch_actions import cells_as_rows


class UserLists:
    """The user-written lists part of a schedule (see the module note)."""

    def _load_csv(self, filename: str, format: str = "compute_only") -> None:
        """Replace this schedule's action lists by those of a torch.distributed.pipelining CSV file (one
        row per rank), as torch's private `_load_csv` does, for code moving over; `schedule_from_actions`
        is pp's public way. `format` is torch's word ("compute_only" or "compute_comms"): pp tells the
        two apart itself (compute-only lists get their sends and receives added). Every rank calls it,
        before the first step. Raises ValueError for an unknown `format` or a bad file (naming the cell)."""
        if format not in ("compute_only", "compute_comms"):
            raise ValueError(f"format must be 'compute_only' or 'compute_comms', got {format!r}")
        self._load_rows(read_rows(filename))

    def _load_rows(self, rows: Mapping[int, Sequence[Any]]) -> None:
        """Run these rows (rank -> cells as `pp.schedules.csvio.read_rows` gives them) from now on. Lists
        that do not make a valid schedule raise (ValueError) and leave the schedule as it was."""
        before = dict(self.__dict__)
        placed = {i: getattr(s, "stage_to_rank", None) for i, s in self._stages.items()}
        try:
            self._rebuild(flatten(rows), rows)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            for i, s in self._stages.items():
                s.stage_to_rank = placed[i]
            raise
        # a step that failed mid-way may have left transfers pending: new lists do not make it safe
        self._broken = before.get("_broken", "")
        self._broken_own = before.get("_broken_own", False)

    @property
    def pipeline_order(self) -> dict[int, list[Any]]:
        """torch's `pipeline_order`: rank -> its compute actions in order, None where it idles (a bubble).

        Assigning it (every rank, before the first step, as torch's test zoo does in a subclass's
        constructor: `{rank: [_Action(0, F, 0), None, ...]}`, or action strings such as "0F0") makes the
        schedule run those lists, pp adding the sends and receives; ValueError naming the cell for one it
        cannot read or a list that does not make a valid schedule."""
        return self._pipeline_order

    @pipeline_order.setter
    def pipeline_order(self, lists: Mapping[int, Sequence[Any]]) -> None:
        self._assign_lists(lists, "pipeline_order")

    @property
    def pipeline_order_with_comms(self) -> dict[int, list[Action]]:
        """rank -> the list it runs, sends and receives included (torch's name). Assigning it, as torch's
        `_PipelineScheduleRuntime` subclasses do, runs those lists as written (see `pipeline_order`)."""
        return self._pipeline_order_with_comms

    @pipeline_order_with_comms.setter
    def pipeline_order_with_comms(self, lists: Mapping[int, Sequence[Any]]) -> None:
        self._assign_lists(lists, "pipeline_order_with_comms")

    def _assign_lists(self, lists: Any, name: str) -> None:
        try:
            self._load_rows(read_rows(cells_as_rows(lists)))
        except ValueError as e:
            raise type(e)(f"{type(self).__name__}.{name}: {e}") from None   # ScheduleError stays one

    def _validate_and_set_stage_mapping(self, actions: Mapping[int, Sequence[Any]]) -> dict[int, int]:
        """torch's step after assigning `pipeline_order` in a constructor: runs `actions` if they are not
        the lists already loaded, and returns {stage: rank} (also `stage_index_to_group_rank`)."""
        if copy_order(actions) != self._loaded_orders[0]:
            self._assign_lists(actions, "pipeline_order")
        return self.stage_index_to_group_rank

    def _prepare_schedule_with_comms(self, actions: Mapping[int, Sequence[Any]], format: str = "compute_only") -> None:
        """torch's runtime step that adds sends and receives to compute-only lists: runs `actions` (pp adds
        the transfers itself where the lists hold none; `format` is taken for torch's signature)."""
        self._assign_lists(actions, "pipeline_order")

    @property
    def stage_index_to_group_rank(self) -> dict[int, int]:
        """{stage index: the rank in the pipeline group that runs it} (torch's name for `stage_to_rank`)."""
        return dict(enumerate(getattr(self, "stage_to_rank", ())))

    def _reload_edited(self) -> None:
        """The caller changed `pipeline_order` or `pipeline_order_with_comms` in place (a row assigned, a
        cell replaced) since they were loaded: run the lists as they are now, as torch reads them at
        each step."""
        if self._pipeline_order_with_comms != self._loaded_orders[1]:
            self._assign_lists(dict(self._pipeline_order_with_comms), "pipeline_order_with_comms")
        else:
            self._assign_lists(dict(self._pipeline_order), "pipeline_order")

    def _check_given_placement(self) -> None:
        """torch's `stage_index_to_group_rank` where the caller gave one: it must be the lists' placement."""
        given = getattr(self, "_given_placement", None)
        if given is None:
            return
        wrong = {s: r for s, r in given.items() if not (0 <= s < self.n_stages) or self.stage_to_rank[s] != r}
        if wrong or len(given) != self.n_stages:
            raise ValueError(f"stage_index_to_group_rank={dict(given)} does not match the schedule, which places "
                             f"stage s on rank stage_to_rank[s] = {self.stage_to_rank}")


def copy_order(order: Mapping[int, Sequence[Any]]) -> dict[int, list[Any]]:
    """A copy of a pipeline_order-like dict, to tell later edits in place from the lists loaded."""
    return {r: list(cells) for r, cells in order.items()}


def placement_of(actions: Mapping[int, Sequence[Action]], n_stages: int, n_ranks: int) -> list[int]:
    """stage -> rank, from the compute actions of user-written lists. ValueError (naming the rank, the
    action and the stage) for a rank outside the group, a stage outside the pipeline, a stage computed on
    two ranks, a send or receive of a stage its rank does not run, or a stage no rank runs."""
    placement: list[int | None] = [None] * n_stages
    for r, acts in actions.items():
        if not 0 <= r < n_ranks:
            raise ValueError(f"the lists name rank {r}, but the pipeline's group has ranks 0..{n_ranks - 1}")
        for a in acts:
            if not 0 <= a.stage < n_stages:
                raise ValueError(f"rank {r}'s action {a} names stage {a.stage}, but the pipeline has "
                                 f"stages 0..{n_stages - 1}")
            if a.is_compute:
                if placement[a.stage] is not None and placement[a.stage] != r:
                    raise ValueError(f"stage {a.stage} is computed on two ranks: rank {placement[a.stage]} and "
                                     f"rank {r} (its action {a}); a stage runs on one rank")
                placement[a.stage] = r
    for r, acts in actions.items():
        for a in acts:
            if a.is_comm and placement[a.stage] != r:
                where = "no rank" if placement[a.stage] is None else f"rank {placement[a.stage]}"
                raise ValueError(f"rank {r}'s action {a} sends or receives for stage {a.stage}, which runs on "
                                 f"{where}: a rank moves only its own stages' data")
    if None in placement:
        missing = [s for s, r in enumerate(placement) if r is None]
        raise ValueError(f"the action lists never run stages {missing}")
    return placement  # type: ignore[return-value]
