"""Which transfers of a batch go to the backend together: groups that the peer posts the same way.

A lowered list's batch (a run of send/recv actions) may meet several batches of a peer: rank 0's
"send activations 1 + receive gradients 0" meets rank 1's "receive activations 1", then its backward,
then "send gradients 0". gloo matches every transfer on its own, so one group per batch works there.
NCCL does not: it runs a rank's groups one after another in the order they were posted and pairs the
i-th send to a peer with the i-th receive from it inside a group, so with several tensors per message
the group above waits for a gradient that rank 1 computes only after receiving what the group sends
later. Hence each batch is cut into groups such that, with every peer, a group holds exactly the
messages of one of that peer's groups, and both sides list them in the same (canonical) order.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .actions import Action, Kind
from .validate import Message, StageGraph, messages_of

Side = tuple[bool, Message]   # (this side sends it, the message)

_SENDS = (Kind.SEND_F, Kind.SEND_B)


def batches(actions: Sequence[Action]) -> list[list[Action]]:
    """The maximal runs of consecutive send/recv actions, in list order."""
    out: list[list[Action]] = []
    prev_comm = False
    for a in actions:
        if a.is_comm:
            if not prev_comm:
                out.append([])
            out[-1].append(a)
        prev_comm = a.is_comm
    return out


def peer_batches(lists: Mapping[int, Sequence[Action]], graph: StageGraph, rank: int) -> dict[Side, int]:
    """For each message `rank` sends or receives: the index of the peer's batch holding its other side."""
    where: dict[tuple[int, bool, Message], int] = {}
    for r, acts in lists.items():
        for b, batch in enumerate(batches(acts)):
            for a in batch:
                for m in messages_of(a, graph):
                    where[(r, a.kind in _SENDS, m)] = b
    out: dict[Side, int] = {}
    for (r, is_send, m), _ in where.items():
        if r != rank:
            continue
        peer = graph.stage_to_rank[m.dst if is_send else m.src]
        other = where.get((peer, not is_send, m))
        if other is not None:
            out[(is_send, m)] = other
    return out


def split_batch(batch: Sequence[Action], graph: StageGraph, rank_of_peer, peer_batch: Mapping[Side, int] | None
                ) -> list[list[tuple[Action, Message]]]:
    """The groups to post for one batch, in order: group k holds, for every peer, the messages met by
    the k-th of that peer's batches this batch meets, sorted canonically (the order both sides use).

    Without `peer_batch` (no full lists known) every message is its own group, in canonical order.
    """
    items: list[tuple[int, int, Message, Action]] = []
    for m, a in sorted(((m, a) for a in batch for m in messages_of(a, graph)), key=lambda x: x[0]):
        is_send = a.kind in _SENDS
        peer = rank_of_peer(m.dst if is_send else m.src)
        key = peer_batch.get((is_send, m), 0) if peer_batch is not None else len(items)
        items.append((peer, key, m, a))
    order: dict[int, list[int]] = {}
    for peer, key, _, _ in items:
        order.setdefault(peer, [])
        if key not in order[peer]:
            order[peer].append(key)
    for keys in order.values():
        keys.sort()
    groups: dict[int, list[tuple[Message, Action]]] = {}
    for peer, key, m, a in items:
        groups.setdefault(order[peer].index(key), []).append((m, a))
    return [[(a, m) for m, a in groups[k]] for k in sorted(groups)]


class RankActions(list):
    """One rank's lowered action list, carrying `peer_batch` (see `peer_batches`) for `split_batch`."""

    def __init__(self, actions: Sequence[Action], peer_batch: Mapping[Side, int] | None = None):
        super().__init__(actions)
        self.peer_batch = peer_batch


def check_groups(lists: Mapping[int, Sequence[Action]], graph: StageGraph) -> None:
    """Prove that the groups `split_batch` posts on every rank can all complete under NCCL's rules;
    raise ScheduleError naming a group otherwise.

    Each group must meet, with each of its peers, exactly one group of that peer holding the same
    messages; a group completes once every such peer group has been posted, and a rank posts its next
    group only after the previous one completed (one stream per rank).
    """
    from .validate import ScheduleError

    to_rank = graph.stage_to_rank
    segs: dict[int, list[frozenset[Side] | None]] = {}
    where: dict[tuple[int, bool, Message], int] = {}
    for r, acts in lists.items():
        pb = peer_batches(lists, graph, r)
        out: list[frozenset[Side] | None] = []
        run: list[Action] = []
        for a in list(acts) + [None]:
            if a is not None and a.is_comm:
                run.append(a)
                continue
            if run:
                for g in split_batch(run, graph, lambda s: to_rank[s], pb):
                    out.append(frozenset((act.kind in _SENDS, m) for act, m in g))
                run = []
            if a is not None:
                out.append(None)
        segs[r] = out
        for i, g in enumerate(out):
            for is_send, m in g or ():
                where[(r, is_send, m)] = i

    def peer_groups(r: int, g: frozenset[Side]) -> set[tuple[int, int]]:
        found = set()
        for is_send, m in g:
            q = to_rank[m.dst if is_send else m.src]
            j = where.get((q, not is_send, m))
            if j is None:
                raise ScheduleError(f"rank {r}: message {m} has no other side on rank {q}")
            found.add((q, j))
        return found

    needs: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for r, out in segs.items():
        for i, g in enumerate(out):
            if g is None:
                continue
            needs[(r, i)] = peer_groups(r, g)
            for q, j in needs[(r, i)]:
                mine = {(not s, m) for s, m in g if to_rank[m.dst if s else m.src] == q}
                theirs = {(s, m) for s, m in segs[q][j] if to_rank[m.dst if s else m.src] == r}
                if mine != theirs:
                    raise ScheduleError(f"rank {r} posts messages {sorted(m for _, m in mine)} with rank {q} as "
                                        f"one group, but rank {q} does not post them as one group: NCCL would hang")
    pos = {r: 0 for r in segs}
    started: set[tuple[int, int]] = set()
    progress = True
    while progress:
        progress = False
        for r, out in segs.items():
            while pos[r] < len(out):
                if out[pos[r]] is not None:
                    started.add((r, pos[r]))
                    if not needs[(r, pos[r])] <= started:
                        break
                pos[r] += 1
                progress = True
    stuck = [r for r in segs if pos[r] < len(segs[r])]
    if stuck:
        raise ScheduleError("the send/recv groups deadlock under NCCL's rules: " + "; ".join(
            f"rank {r} waits in a group of {sorted(m for _, m in segs[r][pos[r]])}" for r in stuck))
