"""torch.distributed.pipelining's schedule CSV files (copied from pytorch's test artifacts into
tests/data/torch_schedules) run through `pp.schedule_from_actions`, and `pipeline_order` as torch has it."""
from __future__ import annotations

import copy
import csv
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.actions import Action, Compound, Kind
from pp.schedules.csvio import read_actions, read_rows, write_actions
from pp.testing import run_ranks
from runtime_models import DeepMLP, manual_stage_module, reference

DATA = Path(__file__).parent / "data" / "torch_schedules"
FILES = sorted(p.name for p in DATA.glob("*.csv"))


@pytest.mark.parametrize("name", FILES)
def test_torch_csv_files_round_trip_through_rows(name, tmp_path):
    rows = read_rows(DATA / name)
    write_actions(rows, tmp_path / name)
    assert list(csv.reader((tmp_path / name).open())) == list(csv.reader((DATA / name).open()))


def test_compound_cells_run_their_actions_in_the_order_written():
    rows = read_rows([["0F0", "(0F7;7B3)OVERLAP_F_B", "", "1UNSHARD", "0REDUCE_GRAD"]])
    assert rows[0][1] == Compound((Action(0, Kind.F, 7), Action(7, Kind.B, 3)))
    assert str(rows[0][1]) == "(0F7;7B3)OVERLAP_F_B" and rows[0][2] is None and len(rows[0]) == 3
    assert read_actions([["0F0", "(0F7;7B3)OVERLAP_F_B"]])[0] == [Action(0, Kind.F, 0), Action(0, Kind.F, 7),
                                                                  Action(7, Kind.B, 3)]
    with pytest.raises(ValueError, match=r"rank 0 \(row 1\), column 1: cannot read compound schedule cell '\(0F7;7SEND_F3\)OVERLAP_F_B'"):
        read_rows([["(0F7;7SEND_F3)OVERLAP_F_B"]])


def test_a_bad_cell_is_named_once_by_rank_and_column():
    """Each refusal says what is wrong once; a dict of lists has no rows to number, and a torch-style
    action with a negative index is out of range (not unreadable)."""
    from pp.schedules.torch_actions import F as FWD, UNSHARD, _Action, cells_as_rows

    with pytest.raises(ValueError) as got:
        read_rows({1: ["1F0", "1X0"]})
    assert str(got.value).startswith("rank 1, column 2: cannot read schedule action '1X0': expected"), got.value
    assert str(got.value).count("expected") == 1, got.value
    with pytest.raises(ValueError, match=r"^rank 0, column 1: _Action\(0, FORWARD, -1\) has microbatch_index=-1: "
                                         r"expected an integer >= 0$"):
        cells_as_rows({0: [_Action(0, FWD, -1)]})
    with pytest.raises(ValueError, match=r"^rank 0, column 1: _Action\(0, FORWARD, -1\) has microbatch_index=-1"):
        read_rows({0: [_Action(0, FWD, -1)]})   # schedule_from_actions' path reads torch actions alike
    with pytest.raises(ValueError, match=r"^rank 0, column 2: _Action\(-2, FORWARD, 0\) has stage_index=-2"):
        cells_as_rows({0: [None, _Action(-2, FWD, 0)]})
    with pytest.raises(ValueError, match=r"has microbatch_index=None"):
        cells_as_rows({0: [_Action(0, FWD, None)]})
    assert read_rows(cells_as_rows({0: [_Action(0, UNSHARD, None), _Action(0, FWD, 0)]})) == {0: [Action(0, Kind.F, 0)]}


def _cells(order: dict) -> list[list[str]]:
    return [["" if a is None else str(a) for a in order[r]] for r in sorted(order)]


def _file_cells(name: str, compute_only: bool) -> list[list[str]]:
    rows = list(csv.reader((DATA / name).open(newline="")))
    if compute_only:
        rows = [[c for c in row if not c or c.startswith("(") or Action.parse(c).is_compute] for row in rows]
    return rows


def _run_csv(rank: int, world: int, name: str, placement: list[int], n_mb: int, via: str = "actions") -> bool:
    """Train one step from a torch CSV; gradients and losses against the unsplit model."""
    torch.manual_seed(0)
    n_stages = len(placement)
    model = DeepMLP(n_layers=n_stages)
    x, y = torch.randn(2 * n_mb, 4), torch.randn(2 * n_mb, 3)
    want_losses, want_grads = reference(model, x, y, n_mb)
    mine = [s for s in range(n_stages) if placement[s] == rank]
    stages = [pp.PipelineStage(manual_stage_module(copy.deepcopy(model), s, n_stages), s, n_stages, "cpu")
              for s in mine]
    if via == "actions":
        sched = pp.schedule_from_actions(stages, n_mb, str(DATA / name), loss_fn=F.mse_loss)
    else:   # torch's own tests: the runtime class, then its private _load_csv
        from pp.schedules import _PipelineScheduleRuntime

        sched = _PipelineScheduleRuntime(stages, n_mb, loss_fn=F.mse_loss)
        with pytest.raises(RuntimeError, match="_load_csv"):
            sched.step(torch.zeros(1))
        sched._load_csv(str(DATA / name), format="compute_comms" if "comms" in name else "compute_only")
    assert sched.stage_to_rank == placement
    comms = "comms" in name
    assert _cells(sched.pipeline_order) == _file_cells(name, compute_only=comms)
    if comms:
        assert _cells(sched.pipeline_order_with_comms) == _file_cells(name, compute_only=False)
    losses: list = []
    held = set(mine)
    sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
    if n_stages - 1 in held:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    for s in stages:
        for n, p in s.submod.named_parameters():
            parts = n.split(".")
            key = ".".join(["layers", str(s.stage_index + int(parts[1]))] + parts[2:]) if parts[0] == "blocks" else n
            torch.testing.assert_close(p.grad, want_grads[key], msg=lambda m: f"{name} stage {s.stage_index} {n}: {m}")
    return True


@pytest.mark.parametrize("name", ["zb1p_2rank_2stagep_compute.csv", "zb1p_2rank_2stagep_comms.csv"])
def test_torch_zero_bubble_csv_trains_as_the_unsplit_model(name):
    assert run_ranks(_run_csv, 2, name, [0, 1, 0, 1], 8) == [True, True]


def test_torch_csv_through_the_runtime_class_and_load_csv_as_torch_tests_do():
    assert run_ranks(_run_csv, 2, "zb1p_2rank_2stagep_compute.csv", [0, 1, 0, 1], 8, "load_csv") == [True, True]


def test_torch_dualpipev_csv_with_overlapped_cells_trains_as_the_unsplit_model():
    assert run_ranks(_run_csv, 4, "dualpipev_4rank_10mb.csv", [0, 1, 2, 3, 3, 2, 1, 0], 10, timeout_s=300) == [True] * 4


def _order_like_torch(rank: int, world: int) -> dict:
    """pipeline_order of the generated schedules, beside torch's for the same sizes."""
    from torch.distributed import pipelining as tp

    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    out = {}
    # (torch 2.13's Schedule1F1B.pipeline_order numbers the last rank's forwards from 1: not compared)
    for name, per in (("ScheduleGPipe", 1), ("ScheduleInterleaved1F1B", 2)):
        n_stages = world * per
        ids = [rank + world * c for c in range(per)]
        mods = [manual_stage_module(copy.deepcopy(model), s, n_stages) for s in ids]
        ours = [pp.PipelineStage(m, s, n_stages, "cpu") for m, s in zip(mods, ids)]
        theirs = [tp.PipelineStage(copy.deepcopy(m), s, n_stages, torch.device("cpu")) for m, s in zip(mods, ids)]
        mine = getattr(pp, name)(ours[0] if per == 1 else ours, 4, loss_fn=F.mse_loss)
        ref = getattr(tp, name)(theirs[0] if per == 1 else theirs, 4, loss_fn=F.mse_loss)
        out[name] = (_cells(mine.pipeline_order), _cells(ref.pipeline_order))
    return out


def test_pipeline_order_of_generated_schedules_matches_torch():
    for name, (ours, theirs) in run_ranks(_order_like_torch, 2)[0].items():
        assert sorted(range(len(ours))) == list(range(2))
        compute = [[c for c in row if c and Action.parse(c).kind in (Kind.F, Kind.B)] for row in ours]
        want = [[c for c in row if re.fullmatch(r"\d+[FB]\d+", c)] for row in theirs]
        assert compute == want, name
        assert any("" in row for row in ours), name  # bubbles are None, as torch shows them


def _out_of_order(rank: int, world: int) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    stage = pp.PipelineStage(copy.deepcopy([model[0:2], model[2:]][rank]), rank, 2, "cpu")
    orders = {0: ["0F0", "0F1", "0F2", "0B2", "0B1", "0B0"],
              1: ["1F2", "1B2", "1F1", "1B1", "1F0", "1B0"]}   # the last stage runs microbatch 2 first
    sched = pp.schedule_from_actions(stage, 3, orders, loss_fn=F.mse_loss)
    losses: list = []
    out = sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
    evaluated = sched.eval(*((x,) if rank == 0 else ()))
    if rank == 0:
        return ()
    with torch.no_grad():
        want = [F.mse_loss(model(a), b) for a, b in zip(x.chunk(3), y.chunk(3))]
        return torch.stack(losses), torch.stack(want), out, evaluated, model(x)


def test_losses_and_outputs_come_in_microbatch_order_whatever_order_the_last_stage_runs():
    """An action list whose last stage ran microbatch 2 first gave the losses and the merged output's
    rows in that order (the output's rows permuted against the batch, no error)."""
    losses, want, out, evaluated, whole = run_ranks(_out_of_order, 2, timeout_s=120)[1]
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(evaluated, whole)


def _stage_out_of_range(rank: int, world: int) -> str:
    stage = pp.PipelineStage(nn.Linear(4, 4), rank, 2, "cpu")
    try:
        pp.schedule_from_actions(stage, 1, {0: ["0F0", "0B0"], 1: ["2F0", "1F0", "1B0"]}, loss_fn=F.mse_loss)
    except ValueError as e:
        return str(e)
    return "accepted"


def test_an_action_naming_a_stage_past_the_pipeline_is_refused_naming_rank_and_cell():
    """It was a bare IndexError from building the placement."""
    for msg in run_ranks(_stage_out_of_range, 2, timeout_s=60):
        assert msg == "rank 1's action 2F0 names stage 2, but the pipeline has stages 0..1", msg
