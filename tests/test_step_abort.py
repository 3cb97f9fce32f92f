"""A rank whose step fails mid-way (a bad input found after the first step) does not leave the other
ranks waiting: they stop within seconds with a line naming the rank that failed (issue 15 item 8)."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F

import pp
from pp.testing import run_ranks
from runtime_models import DeepMLP, manual_stage_module, reference


def _bad_input_after_first_step(rank: int, world: int, traced: bool, bad: str) -> tuple:
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    if traced:
        pipe = pp.pipeline(model, (x[:2],), split_policy=pp.split_into_equal_size(world))
        stage = pipe.build_stage(rank, "cpu")
    else:
        stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss)
    first, last = rank == 0, rank == world - 1
    losses: list = []
    sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
    if last:  # the first step is right
        torch.testing.assert_close(torch.stack(losses), reference(model, x, y, 4)[0])
    wrong = torch.randn(8, 5) if bad == "shape" else x.double()
    start = time.monotonic()
    try:
        sched.step(*((wrong,) if first else ()), target=y if last else None)
    except Exception as e:  # noqa: BLE001 - which error each rank raised is the result
        result = type(e).__name__, str(e), time.monotonic() - start
    else:
        return "no error", "", time.monotonic() - start
    # Every rank caught its error and goes on with a good batch (a "skip the bad batch" loop): the failed
    # step's receives may still be pending and would take this step's messages (a hang, or gloo's
    # size-mismatch abort, before): every rank refuses at once instead
    try:
        sched.step(*((x,) if first else ()), target=y if last else None)
    except RuntimeError as e:
        return (*result, str(e))
    return (*result, "no error")


@pytest.mark.parametrize("traced,bad", [(False, "shape"), (True, "dtype")], ids=["manual-shape", "traced-dtype"])
def test_a_rank_failing_mid_step_stops_the_others_promptly(traced, bad):
    results = run_ranks(_bad_input_after_first_step, 2, traced, bad, timeout_s=120)
    failed = [r for r, (kind, *_) in enumerate(results) if kind not in ("PipelineAborted", "no error")]
    assert len(failed) >= 1, results
    for rank, (kind, message, seconds, _) in enumerate(results):
        assert kind != "no error", results
        if rank not in failed:
            assert kind == "PipelineAborted", results
            assert f"rank {failed[0]} failed with" in message and "stopped waiting in" in message, message
        assert seconds < 30, results  # the process group's timeout is 120 s
    for kind, _, _, after in results:
        if traced:   # the traced stage's input check refused the batch before any rank started the step
            assert after == "no error", results
        else:        # a forward failed mid-step
            assert after.startswith("this pipeline cannot run another step: an earlier step failed mid-way on "
                                    f"rank {failed[0]}"), results


def _disagreeing_ranks(rank: int, world: int) -> list[str]:
    """Ranks that build other schedules or call other methods: once each waited on the other forever."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    first, last = rank == 0, rank == world - 1
    cases = {"step-vs-eval": (pp.Schedule1F1B, 4, "step" if first else "eval"),
             "gpipe-vs-1f1b": (pp.ScheduleGPipe if first else pp.Schedule1F1B, 4, "step"),
             "microbatches": (pp.Schedule1F1B, 2 if first else 4, "step")}
    out = []
    for case, (cls, n_mb, method) in cases.items():
        sched = cls(stage, n_mb, loss_fn=F.mse_loss)
        try:
            getattr(sched, method)(*((x,) if first else ()), target=y if last else None)
        except ValueError as e:
            out.append(str(e))
        else:
            out.append(f"{case}: no error")
    return out


def test_ranks_that_disagree_on_the_schedule_or_method_are_refused_on_every_rank():
    for messages in run_ranks(_disagreeing_ranks, 2, timeout_s=60):
        for m in messages:
            assert m.startswith("the ranks disagree on the pipeline") and "rank 0 calls" in m and "rank 1 calls" in m, m
        assert "rank 0 calls step of" in messages[0] and "rank 1 calls eval of" in messages[0], messages[0]
        assert "rank 0 calls step of ScheduleGPipe" in messages[1] and "rank 1 calls step of Schedule1F1B" in messages[1]
        assert "with 2 microbatches" in messages[2] and "with 4 microbatches" in messages[2]


SCRIPT = """
import os, torch, torch.nn as nn, torch.nn.functional as F, pp
from pp.comms.backend import init_process_group_from_env
init_process_group_from_env()
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
x, y = torch.randn(8, 16), torch.randn(8, {target_cols})
st = pp.PipelineStage(model[:2] if rank == 0 else model[2:], rank, 2, "cpu", input_args={input_args})
sch = pp.Schedule1F1B(st, 4, F.mse_loss)
sch.step(*((x{cast},) if rank == 0 else ()), target=y if rank == 1 else None)
"""


@pytest.mark.parametrize("case", ["refused", "mid_step"])
def test_a_script_that_fails_a_step_exits_with_code_1_not_an_abort(tmp_path, case):
    """Under torchrun an uncaught step error ended a rank with SIGABRT ("terminate called without an
    active exception", exit code -6) in most runs, found by a fresh-user check: gloo's threads outlived
    the interpreter's shutdown. A refused step (no transfer started) and a loss failing mid-step."""
    import os
    import subprocess
    import sys

    from pp.testing import _free_port

    script = tmp_path / "fail.py"
    script.write_text(SCRIPT.format(
        target_cols=4 if case == "refused" else 5,
        input_args="(x[:2],) if rank == 0 else (torch.randn(2, 32),)" if case == "refused" else "None",
        cast=".double()" if case == "refused" else ""))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(_free_port()), str(script)],
                             capture_output=True, text=True, timeout=120, env=env)
        out = run.stdout + run.stderr
        assert "terminate called" not in out and "exitcode  : -6" not in out, out[-3000:]
        assert run.returncode == 1, out[-3000:]


DYING = """
import os, torch, torch.nn as nn, torch.nn.functional as F, pp
from pp.comms.backend import init_process_group_from_env
init_process_group_from_env()
rank = int(os.environ["RANK"])
torch.manual_seed(0)

class Dies(nn.Module):
    calls = 0
    def forward(self, x):
        Dies.calls += 1
        if Dies.calls == {call}:
            os._exit(3)   # killed, crashed: no error is reported
        return x

model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), Dies(), nn.Linear(32, 4))
x, y = torch.randn(8, 16), torch.randn(8, 4)
sch = pp.Schedule1F1B(pp.PipelineStage(model[:2] if rank == 0 else model[2:], rank, 2, "cpu"), 4, F.mse_loss)
if rank == 1 and {call} == 0:
    os._exit(3)   # gone before its first step (a constructor error caught badly, a crash)
try:
    for _ in range(2):
        sch.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
except Exception as e:
    print(f"rank {{rank}}: {{type(e).__name__}}: {{e}}", flush=True)
    os._exit(1)
"""


def _two_processes(script, text: str) -> list[str]:
    """Run `text` as two ranks (plain processes, gloo); rank 0 must exit 1 and rank 1 (which dies) 3."""
    import os
    import subprocess
    import sys

    from pp.testing import _free_port

    script.write_text(text)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 3], outs
    return outs


@pytest.mark.parametrize("call", [0, 3, 6])   # before any step, in the first step (metadata), in the second
def test_a_peer_that_dies_without_a_word_is_named_as_such(tmp_path, call):
    """A rank whose process ends mid-step without reporting (killed, crashed) left its peers with gloo's
    raw "Connection reset by peer ... GLHF!" line; they now raise PipelineAborted saying a peer closed its
    connection and where they waited."""
    outs = _two_processes(tmp_path / "dying.py", DYING.format(call=call))
    assert ("rank 0: PipelineAborted: a peer rank closed its connection (its process ended or was killed without "
            "reporting an error) while rank 0 waited in ") in outs[0], outs[0]
    assert "GLHF" not in outs[0], outs[0]
    assert ("waited in the step's opening agreement" in outs[0]) == (call == 0), outs[0]


DYING_REPLICA = """
import os, torch, torch.nn as nn, torch.nn.functional as F, pp
from pp.comms.backend import init_process_group_from_env
init_process_group_from_env()
rank = int(os.environ["RANK"])
torch.manual_seed(0)
calls = []

def loss_fn(out, target):
    calls.append(1)
    if rank == 1 and len(calls) == 3:
        os._exit(3)   # killed, crashed: no error is reported
    return F.mse_loss(out, target)

model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
x, y = torch.randn(8, 16), torch.randn(8, 4)
par = pp.parallelize(model, (x[:2],), n_microbatches=2, loss_fn=loss_fn, pp=1, dp=2, device="cpu")
try:
    for _ in range(2):
        par.step(par.local_share(x), target=par.local_share(y))
except Exception as e:
    print(f"rank {{rank}}: {{type(e).__name__}}: {{e}}", flush=True)
    os._exit(1)
"""


def test_a_data_parallel_replica_that_dies_is_named_as_such(tmp_path):
    """A replica whose process ends mid-step left the other replicas with gloo's raw line from their
    gradient all-reduce; they now raise PipelineAborted saying a peer closed its connection there."""
    outs = _two_processes(tmp_path / "dying_replica.py", DYING_REPLICA.format())
    assert ("rank 0: PipelineAborted: a peer rank closed its connection (its process ended or was killed without "
            "reporting an error) while rank 0 waited in a data-parallel gradient all-reduce") in outs[0], outs[0]


CAUGHT = """
import os, sys, torch, torch.nn as nn, torch.nn.functional as F, pp
from pp.comms.backend import init_process_group_from_env
init_process_group_from_env()
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
x, y = torch.randn(8, 16), torch.randn(8, 5)   # the loss fails mid-step on rank 1
sch = pp.Schedule1F1B(pp.PipelineStage(model[:2] if rank == 0 else model[2:], rank, 2, "cpu"), 4, F.mse_loss)
try:
    sch.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
except Exception as e:
    print(f"rank {{rank}} caught {{type(e).__name__}}", flush=True)
    if rank == 1:   # torchrun stops the other ranks once one exits: rank 0 reports first (a loaded machine)
        import time; time.sleep(2)
    {leave}
"""


@pytest.mark.parametrize("leave,code", [("pass", 0), ("sys.exit(3)", 3)])
def test_a_script_that_catches_a_failed_step_ends_with_its_own_exit_code(tmp_path, leave, code):
    """A script that caught a mid-step failure and ended (or called sys.exit) was aborted at exit on the
    rank that had been waiting (SIGABRT, exit code -6; its pending transfer's thread woke during the
    interpreter's shutdown). Every rank now ends with the script's own code."""
    import os
    import subprocess
    import sys

    from pp.testing import _free_port

    script = tmp_path / "caught.py"
    script.write_text(CAUGHT.format(leave=leave))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), str(script)],
                         capture_output=True, text=True, timeout=120, env=env)
    out = run.stdout + run.stderr
    assert "rank 0 caught PipelineAborted" in out and "rank 1 caught RuntimeError" in out, out[-3000:]
    assert "terminate called" not in out and "exitcode  : -6" not in out, out[-3000:]
    assert run.returncode == (1 if code else 0), out[-3000:]
    if code:
        assert f"exitcode  : {code}" in out, out[-3000:]


def _alone(rank: int, world: int) -> list:
    """torch's test pattern: rank 0 alone calls step() with a bad batch. pp's ranks agree on each step,
    so rank 0 waits for rank 1; after AGREEMENT_NOTICE_S it says what it waits for (not a silent hang),
    and once rank 1 comes both raise rank 0's refusal."""
    import time
    import warnings

    import torch.nn as nn
    import torch.nn.functional as F

    import pp.schedules.base as base

    base.AGREEMENT_NOTICE_S = 1.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    example = torch.randn(2, 16) if rank == 0 else torch.randn(2, 32)   # its inputs are checked before the step
    sch = pp.Schedule1F1B(pp.PipelineStage(model[:2] if rank == 0 else model[2:], rank, 2, "cpu", input_args=example),
                          2, F.mse_loss)
    if rank == 1:
        time.sleep(4)   # the peer comes late
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sch.step(*((torch.randn(4, 17),) if rank == 0 else ()), target=torch.randn(4, 4) if rank == 1 else None)
        except Exception as e:  # noqa: BLE001 - the refusal is what this test reads
            error = f"{type(e).__name__}: {e}"
    return [error, [str(w.message) for w in caught if "opening agreement" in str(w.message)]]


def test_a_rank_calling_step_alone_says_what_it_waits_for():
    (e0, w0), (e1, w1) = run_ranks(_alone, 2, timeout_s=90)
    assert len(w0) == 1 and w0[0].startswith("rank 0 has waited 1 s in the step's opening agreement"), w0
    assert "a rank that calls it alone waits here until they do" in w0[0] and w1 == [], w1
    assert e0.startswith("ValueError: ") and "17" in e0, e0
    assert e1.startswith("RuntimeError: pipeline step aborted: rank 0 refused the step"), e1
