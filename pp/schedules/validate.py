"""Prove schedule action lists correct before anything runs: placement, completeness, data order, and
freedom from deadlock under the strict batched-communication model that the executor follows.

Strict model: each rank walks its list in order; a maximal run of consecutive send/recv actions is one
batch; a batch starts when the rank reaches it; each of its messages completes once the peer's batch
holding the matching op has started; the rank moves on when all messages of the batch completed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping, NamedTuple, Sequence

from pp.schedules.actions import Action, Kind

Lists = Mapping[int, Sequence[Action]]
Edges = Mapping[int, Sequence[int]]


class ScheduleError(ValueError):
    """Action lists that cannot run correctly; the message names the rank, the action and what is wrong."""


@dataclass(frozen=True)
class StageGraph:
    """Who feeds whom: each stage's producers and consumers, and the rank that holds each stage."""

    stage_to_rank: tuple[int, ...]
    producers: tuple[tuple[int, ...], ...]
    consumers: tuple[tuple[int, ...], ...]

    @property
    def n_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def n_ranks(self) -> int:
        return max(self.stage_to_rank) + 1

    @cached_property
    def _remote(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        rank = self.stage_to_rank
        return ([tuple(p for p in ps if rank[p] != rank[s]) for s, ps in enumerate(self.producers)],
                [tuple(c for c in cs if rank[c] != rank[s]) for s, cs in enumerate(self.consumers)])

    def remote_producers(self, stage: int) -> tuple[int, ...]:
        """Producers of `stage` that live on another rank (its inputs that arrive by message)."""
        return self._remote[0][stage]

    def remote_consumers(self, stage: int) -> tuple[int, ...]:
        """Consumers of `stage` that live on another rank (its outputs that leave by message)."""
        return self._remote[1][stage]


def stage_graph(stage_to_rank: Sequence[int], edges: Edges | None = None) -> StageGraph:
    """Check a placement and producer->consumer edges (default: the chain s -> s+1) and index them."""
    placement = tuple(stage_to_rank)
    if not placement or any(not isinstance(r, int) or r < 0 for r in placement):
        raise ScheduleError(f"stage_to_rank must be a non-empty list of rank numbers >= 0, got {list(placement)!r}")
    n = len(placement)
    if edges is None:
        edges = {s: [s + 1] for s in range(n - 1)}
    producers: list[list[int]] = [[] for _ in range(n)]
    consumers: list[list[int]] = [[] for _ in range(n)]
    for p, cs in edges.items():
        for c in cs:
            if not (0 <= p < c < n):
                raise ScheduleError(
                    f"edge {p} -> {c} is not a forward edge between stages 0..{n - 1}: "
                    "a producer stage must come before its consumer"
                )
            if c in consumers[p]:
                raise ScheduleError(f"edge {p} -> {c} is listed twice")
            consumers[p].append(c)
            producers[c].append(p)
    return StageGraph(placement, tuple(tuple(sorted(x)) for x in producers), tuple(tuple(sorted(x)) for x in consumers))


class Message(NamedTuple):
    """One tensor bundle crossing ranks; sorting by this tuple is the canonical order both sides agree on."""

    backward: bool  # False: activations src -> dst; True: gradients from consumer src back to producer dst
    src: int
    dst: int
    microbatch: int


def messages_of(action: Action, graph: StageGraph) -> list[Message]:
    """The messages one send/recv action moves (`peer=None` means every remote peer in that direction)."""
    s, kind, mb = action.stage, action.kind, action.microbatch
    if kind in (Kind.SEND_F, Kind.RECV_B):
        peers, what = graph.remote_consumers(s), "consumer"
    else:
        peers, what = graph.remote_producers(s), "producer"
    if action.peer is not None:
        if action.peer not in peers:
            raise ScheduleError(
                f"rank {graph.stage_to_rank[s]}: {action} names stage {action.peer}, which is not a {what} "
                f"of stage {s} on another rank (remote {what}s: {list(peers)})"
            )
        peers = (action.peer,)
    if not peers:
        raise ScheduleError(f"rank {graph.stage_to_rank[s]}: {action} has nothing "
                            f"to move: stage {s} has no {what} on another rank")
    if kind == Kind.SEND_F:
        return [Message(False, s, c, mb) for c in peers]
    if kind == Kind.RECV_F:
        return [Message(False, p, s, mb) for p in peers]
    if kind == Kind.SEND_B:
        return [Message(True, s, p, mb) for p in peers]
    return [Message(True, c, s, mb) for c in peers]


def _rank_keys(lists: Lists, graph: StageGraph) -> list[int]:
    for r in lists:
        if not isinstance(r, int) or not 0 <= r < graph.n_ranks:
            raise ScheduleError(f"lists name rank {r!r}, but the placement has ranks 0..{graph.n_ranks - 1}")
    return list(range(graph.n_ranks))


def check_placement(lists: Lists, graph: StageGraph, n_microbatches: int) -> None:
    """Every action is a real Action, names a real stage and microbatch, and sits on the rank holding its stage."""
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ScheduleError(f"n_microbatches must be an integer >= 1, got {n_microbatches!r}")
    for r in _rank_keys(lists, graph):
        for a in lists.get(r, ()):
            if not isinstance(a, Action):
                raise ScheduleError(f"rank {r}: {a!r} is not an Action")
            if not 0 <= a.stage < graph.n_stages:
                raise ScheduleError(f"rank {r}: {a} names stage {a.stage}, but stages are 0..{graph.n_stages - 1}")
            if not 0 <= a.microbatch < n_microbatches:
                raise ScheduleError(f"rank {r}: {a} names microbatch {a.microbatch}, "
                                    f"but microbatches are 0..{n_microbatches - 1}")
            if graph.stage_to_rank[a.stage] != r:
                raise ScheduleError(f"rank {r}: {a} is on the wrong rank: stage {a.stage} "
                                    f"lives on rank {graph.stage_to_rank[a.stage]}")


def check_complete(lists: Lists, graph: StageGraph, n_microbatches: int, forward_only: bool = False) -> None:
    """Each (stage, microbatch) has exactly one F and exactly one B or one I+W pair, never B mixed with I/W;
    with `forward_only`, exactly one F and no backward at all."""
    counts: dict[tuple[int, Kind, int], int] = {}
    for r in _rank_keys(lists, graph):
        for a in lists.get(r, ()):
            if a.is_compute:
                key = (a.stage, a.kind, a.microbatch)
                counts[key] = counts.get(key, 0) + 1
                if counts[key] > 1:
                    raise ScheduleError(f"rank {r}: {a} appears more than once")
    # Lists with no backward at all are a forward-only (inference) schedule.
    forward_only = not any(k[1] != Kind.F for k in counts)
    for s in range(graph.n_stages):
        r = graph.stage_to_rank[s]
        for mb in range(n_microbatches):
            has = {k: counts.get((s, k, mb), 0) for k in (Kind.F, Kind.B, Kind.I, Kind.W)}
            if not has[Kind.F]:
                raise ScheduleError(f"rank {r}: stage {s} microbatch {mb} has no forward {Action(s, Kind.F, mb)}")
            if forward_only:
                if has[Kind.B] or has[Kind.I] or has[Kind.W]:
                    raise ScheduleError(f"rank {r}: stage {s} microbatch {mb} has a backward in forward-only lists")
                continue
            if has[Kind.B] and (has[Kind.I] or has[Kind.W]):
                raise ScheduleError(f"rank {r}: stage {s} microbatch {mb} mixes a full "
                                    f"backward {s}B{mb} with split {s}I{mb}/{s}W{mb}")
            if forward_only:
                continue
            if not has[Kind.B] and not (has[Kind.I] and has[Kind.W]):
                missing = "a backward (B, or I and W)" if not (has[Kind.I] or has[Kind.W]) else (
                    f"{s}W{mb} after its {s}I{mb}" if has[Kind.I] else f"{s}I{mb} before its {s}W{mb}")
                raise ScheduleError(f"rank {r}: stage {s} microbatch {mb} is missing {missing}")


def check_data_order(lists: Lists, graph: StageGraph) -> None:
    """Walk each rank's list: every compute finds its inputs, every send finds what it sends, nothing twice."""
    sent: dict[Message, Action] = {}
    received: dict[Message, Action] = {}
    for r in _rank_keys(lists, graph):
        done: set[tuple[int, Kind, int]] = set()
        got: set[Message] = set()
        for a in lists.get(r, ()):
            s, mb = a.stage, a.microbatch
            if a.kind == Kind.F:
                for p in graph.producers[s]:
                    if graph.stage_to_rank[p] == r and (p, Kind.F, mb) not in done:
                        raise ScheduleError(f"rank {r}: {a} runs before its input {p}F{mb} was computed on this rank")
                    if graph.stage_to_rank[p] != r and Message(False, p, s, mb) not in got:
                        raise ScheduleError(f"rank {r}: {a} runs before its input from "
                                            f"stage {p} was received (no earlier RECV_F)")
            elif a.kind in (Kind.B, Kind.I):
                if (s, Kind.F, mb) not in done:
                    raise ScheduleError(f"rank {r}: {a} runs before its forward {s}F{mb}")
                for c in graph.consumers[s]:
                    if graph.stage_to_rank[c] == r and (c, Kind.B, mb) not in done and (c, Kind.I, mb) not in done:
                        raise ScheduleError(f"rank {r}: {a} runs before the output "
                                            f"gradient from {c}B{mb}/{c}I{mb} on this rank")
                    if graph.stage_to_rank[c] != r and Message(True, c, s, mb) not in got:
                        raise ScheduleError(f"rank {r}: {a} runs before its output gradient "
                                            f"from stage {c} was received (no earlier RECV_B)")
            elif a.kind == Kind.W:
                if (s, Kind.I, mb) not in done:
                    raise ScheduleError(f"rank {r}: {a} runs before its input-gradient step {s}I{mb}")
            else:
                msgs = messages_of(a, graph)
                if a.kind == Kind.SEND_F and (s, Kind.F, mb) not in done:
                    raise ScheduleError(f"rank {r}: {a} sends outputs of {s}F{mb} before it was computed")
                if a.kind == Kind.SEND_B and (s, Kind.B, mb) not in done and (s, Kind.I, mb) not in done:
                    raise ScheduleError(f"rank {r}: {a} sends input gradients of stage "
                                        f"{s} microbatch {mb} before {s}B{mb}/{s}I{mb} ran")
                pool = sent if a.kind in (Kind.SEND_F, Kind.SEND_B) else received
                for m in msgs:
                    if m in pool:
                        raise ScheduleError(f"rank {r}: {a} moves {_describe(m)} a second time")
                    pool[m] = a
                if pool is received:
                    got.update(msgs)
            if a.is_compute:
                done.add((s, a.kind, mb))
    for m in sorted(set(sent) - set(received)):
        raise ScheduleError(f"rank {graph.stage_to_rank[m.src]}: {sent[m]} sends the {_describe(m)}, "
                            f"which rank {graph.stage_to_rank[m.dst]} never receives")
    for m in sorted(set(received) - set(sent)):
        raise ScheduleError(f"rank {graph.stage_to_rank[m.dst]}: {received[m]} waits for the {_describe(m)}, "
                            f"which rank {graph.stage_to_rank[m.src]} never sends")


def _describe(m: Message) -> str:
    what = "gradients" if m.backward else "activations"
    return f"{what} of microbatch {m.microbatch} from stage {m.src} to stage {m.dst}"


def run_strict(
    lists: Lists,
    graph: StageGraph,
    duration: Callable[[Action], float] = lambda a: 0.0,
    comm_cost: float = 0.0,
) -> dict[int, list[tuple[float, float]]]:
    """Run lowered lists under the strict model; return (start, end) of every action, per rank, in list order.

    Raises ScheduleError on an unmatched send/recv or on deadlock (naming each stuck rank's action).
    """
    ranks = _rank_keys(lists, graph)
    batches: list[list[int]] = []  # batch id -> indices into its rank's list
    batch_rank: list[int] = []
    segments: dict[int, list[tuple[bool, int]]] = {}  # rank -> [(is_batch, action index or batch id)]
    where: dict[tuple[bool, Message], tuple[int, Action]] = {}  # (is_send, message) -> (batch, action)
    for r in ranks:
        segments[r] = segs = []
        for i, a in enumerate(lists.get(r, ())):
            if not a.is_comm:
                segs.append((False, i))
                continue
            if not segs or not segs[-1][0]:
                batches.append([])
                batch_rank.append(r)
                segs.append((True, len(batches) - 1))
            bid = segs[-1][1]
            batches[bid].append(i)
            is_send = a.kind in (Kind.SEND_F, Kind.SEND_B)
            for m in messages_of(a, graph):
                if (is_send, m) in where:
                    raise ScheduleError(f"rank {r}: {a} moves {_describe(m)} a second time")
                where[(is_send, m)] = (bid, a)
    peers: list[list[tuple[int, Action, Action]]] = [[] for _ in batches]  # (peer batch, peer action, own action)
    for (is_send, m), (bid, a) in where.items():
        other = where.get((not is_send, m))
        if other is None:
            peer = graph.stage_to_rank[m.dst if is_send else m.src]
            raise ScheduleError(f"rank {batch_rank[bid]}: {a} has no matching {'receive' if is_send else 'send'} "
                                f"on rank {peer} for the {_describe(m)}")
        peers[bid].append((other[0], other[1], a))

    started: list[float | None] = [None] * len(batches)
    times: dict[int, list[tuple[float, float]]] = {r: [(0.0, 0.0)] * len(lists.get(r, ())) for r in ranks}
    pos = {r: 0 for r in ranks}
    now = {r: 0.0 for r in ranks}
    progress = True
    while progress:
        progress = False
        for r in ranks:
            segs, acts = segments[r], lists.get(r, ())
            while pos[r] < len(segs):
                is_batch, k = segs[pos[r]]
                if not is_batch:
                    end = now[r] + duration(acts[k])
                    times[r][k] = (now[r], end)
                    now[r] = end
                elif started[k] is None:
                    started[k] = now[r]
                    progress = True
                    continue
                else:
                    if any(started[q] is None for q, _, _ in peers[k]):
                        break
                    start = started[k]
                    end = max([start] + [max(start, started[q]) + comm_cost for q, _, _ in peers[k]])
                    for i in batches[k]:
                        times[r][i] = (start, end)
                    now[r] = end
                pos[r] += 1
                progress = True
    stuck = [r for r in ranks if pos[r] < len(segments[r])]
    if stuck:
        parts = []
        for r in stuck:
            k = segments[r][pos[r]][1]
            q, pa, mine = next(item for item in peers[k] if started[item[0]] is None)
            parts.append(f"rank {r} is stuck at {mine} waiting for rank {batch_rank[q]} to reach {pa}")
        raise ScheduleError("deadlock: " + "; ".join(parts))
    return times


def asap_times(
    lists: Lists,
    graph: StageGraph,
    duration: Callable[[Action], float],
    comm_cost: float = 0.0,
) -> dict[int, list[tuple[float, float]]]:
    """Run compute-only lists as soon as each action's rank and inputs allow; return (start, end) per action.

    Dependencies: F(c,m) needs F(p,m) of every producer p; B/I(s,m) need F(s,m) and the B/I(c,m) of every
    consumer c; W(s,m) needs I(s,m). A message between ranks adds `comm_cost`. Raises ScheduleError naming
    the stuck actions if the order can never be satisfied.
    """
    ranks = _rank_keys(lists, graph)
    end_of: dict[tuple[int, Kind, int], float] = {}
    for r in ranks:
        for a in lists.get(r, ()):
            if a.is_comm:
                raise ScheduleError(f"rank {r}: {a} is a send/recv, but compute-only lists were expected")

    def deps(a: Action) -> list[tuple[int, tuple[tuple[int, Kind, int], ...]]]:
        s, mb = a.stage, a.microbatch
        if a.kind == Kind.F:
            return [(p, ((p, Kind.F, mb),)) for p in graph.producers[s]]
        if a.kind == Kind.W:
            return [(s, ((s, Kind.I, mb),))]
        return [(s, ((s, Kind.F, mb),))] + [(c, ((c, Kind.B, mb), (c, Kind.I, mb))) for c in graph.consumers[s]]

    times: dict[int, list[tuple[float, float]]] = {r: [] for r in ranks}
    free = {r: 0.0 for r in ranks}
    progress = True
    while progress:
        progress = False
        for r in ranks:
            acts = lists.get(r, ())
            while len(times[r]) < len(acts):
                a = acts[len(times[r])]
                start = free[r]
                for dep_stage, options in deps(a):
                    ends = [end_of[o] for o in options if o in end_of]
                    if not ends:
                        break
                    gap = comm_cost if graph.stage_to_rank[dep_stage] != r else 0.0
                    start = max(start, ends[0] + gap)
                else:
                    end = start + duration(a)
                    times[r].append((start, end))
                    end_of[(a.stage, a.kind, a.microbatch)] = end
                    free[r] = end
                    progress = True
                    continue
                break
    stuck = [r for r in ranks if len(times[r]) < len(lists.get(r, ()))]
    if stuck:
        parts = []
        for r in stuck:
            a = lists[r][len(times[r])]
            need = [" or ".join(f"{o[0]}{o[1].value}{o[2]}" for o in opts) for _, opts in deps(a)
                    if not any(o in end_of for o in opts)]
            parts.append(f"rank {r} is stuck at {a} (needs {', '.join(need)})")
        raise ScheduleError("the compute order can never run: " + "; ".join(parts))
    return times


def validate_compute(
    lists: Lists, stage_to_rank: Sequence[int], n_microbatches: int, edges: Edges | None = None, forward_only: bool = False
) -> None:
    """Prove compute-only lists runnable: placement, completeness, W after I, and an order that can progress.
    `forward_only` lists (evaluation) hold exactly one F per (stage, microbatch) and nothing else."""
    graph = stage_graph(stage_to_rank, edges)
    check_placement(lists, graph, n_microbatches)
    for r, acts in lists.items():
        seen_i: set[tuple[int, int]] = set()
        for a in acts:
            if a.is_comm:
                raise ScheduleError(f"rank {r}: {a} is a send/recv, but compute-only lists were expected")
            if a.kind == Kind.I:
                seen_i.add((a.stage, a.microbatch))
            if a.kind == Kind.W and (a.stage, a.microbatch) not in seen_i:
                raise ScheduleError(f"rank {r}: {a} runs before its input-gradient step {a.stage}I{a.microbatch}")
    check_complete(lists, graph, n_microbatches, forward_only)
    asap_times(lists, graph, lambda a: 1.0)


def validate(
    lists: Lists, stage_to_rank: Sequence[int], n_microbatches: int, edges: Edges | None = None, forward_only: bool = False
) -> None:
    """Prove lowered lists (compute plus send/recv) correct and deadlock-free; raise ScheduleError otherwise.
    `forward_only` lists (evaluation) hold exactly one F per (stage, microbatch) and no backward."""
    graph = stage_graph(stage_to_rank, edges)
    check_placement(lists, graph, n_microbatches)
    check_complete(lists, graph, n_microbatches, forward_only)
    check_data_order(lists, graph)
    run_strict(lists, graph)
