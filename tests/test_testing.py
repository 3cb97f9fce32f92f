"""run_ranks: results by rank, collectives work, failures and hangs are reported, nothing leaks."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from pp.testing import RankError, _collect, run_ranks


def _rank_info(rank: int, world_size: int, tag: str) -> tuple:
    return (rank, world_size, tag, dist.get_rank(), dist.get_world_size(),
            os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"],
            os.environ["OMP_NUM_THREADS"], torch.get_num_threads())


def _all_reduce(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _rank1_raises_others_collect(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(0.2)
        raise ValueError("boom on purpose")
    t = torch.zeros(1)
    dist.all_reduce(t)  # fails once rank 1 is gone: a secondary error that must not mask rank 1's


def _rank2_hangs(rank: int, world_size: int) -> int:
    if rank == 2:
        time.sleep(3600)
    return rank


def _rank0_dies_silently(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    dist.all_reduce(torch.zeros(1))


def _returns_rank(rank: int, world_size: int) -> int:
    return rank


def test_run_ranks_returns_values_by_rank_and_sets_torchrun_env() -> None:
    out = run_ranks(_rank_info, 2, "x")
    assert out == [(r, 2, "x", r, 2, str(r), str(r), "2", "1", 1) for r in range(2)]
    assert multiprocessing.active_children() == []


def test_all_reduce_across_four_ranks_sums() -> None:
    assert run_ranks(_all_reduce, 4) == [10.0] * 4


def test_raising_rank_is_reported_first_with_traceback() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(_rank1_raises_others_collect, 2, timeout_s=60)
    msg = str(info.value)
    assert msg.startswith("rank 1 raised ValueError: boom on purpose")
    assert "_rank1_raises_others_collect" in msg  # the child's traceback follows
    assert info.value.rank == 1
    assert multiprocessing.active_children() == []


def test_earliest_failure_wins_when_reports_arrive_together() -> None:
    # Rank 0's report (a peer-died error) is later than rank 1's but is read in the same drain.
    pipes = [multiprocessing.Pipe(duplex=False) for _ in range(2)]
    now = time.time()
    pipes[0][1].send(("err", now + 1.0, ("RuntimeError", "Connection closed by peer", "tb0")))
    pipes[1][1].send(("err", now, ("ValueError", "boom", "tb1")))
    with pytest.raises(RankError, match=r"^rank 1 raised ValueError: boom"):
        _collect([None, None], [r for r, _ in pipes], time.monotonic() + 5, 5, _returns_rank)


def test_a_rank_stopped_by_another_does_not_hide_the_cause() -> None:
    # Rank 1 reports first that it stopped because rank 0 failed; rank 0's own reason comes 0.3 s later.
    pipes = [multiprocessing.Pipe(duplex=False) for _ in range(2)]
    now = time.time()
    pipes[1][1].send(("err", now, ("RuntimeError", "pipeline step aborted: rank 0 refused the step", "tb1")))

    def later() -> None:
        time.sleep(0.3)
        pipes[0][1].send(("err", now + 0.3, ("ValueError", "stage 0 input 0: expected int64", "tb0")))

    import threading
    threading.Thread(target=later).start()
    with pytest.raises(RankError, match=r"^rank 0 raised ValueError: stage 0 input 0"):
        _collect([None, None], [r for r, _ in pipes], time.monotonic() + 10, 10, _returns_rank)


def test_hanging_rank_times_out_naming_it_and_leaves_no_child() -> None:
    start = time.monotonic()
    # Under heavy load the timeout can fire before every rank has started: then all are named.
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[(0, 1, )?2\] had not finished"):
        run_ranks(_rank2_hangs, 3, timeout_s=8)
    assert time.monotonic() - start < 18
    assert multiprocessing.active_children() == []


def test_rank_that_dies_without_reporting_is_named() -> None:
    with pytest.raises(RankError, match=r"^rank 0 raised ProcessExit: exited with code 3"):
        run_ranks(_rank0_dies_silently, 2, timeout_s=60)
    assert multiprocessing.active_children() == []


def test_unpicklable_function_is_rejected_in_the_parent() -> None:
    with pytest.raises(ValueError, match="picklable"):
        run_ranks(lambda rank, ws: rank, 2)
