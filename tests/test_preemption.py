"""Preemption and shared output directories, with real torchrun jobs and real signals.

A stop signal to torchrun (SIGTERM; SIGUSR1 when torchrun is told to pass it on) makes every rank finish
its step, save it and exit; a second job on a busy output.dir stops before touching it; a lock left by a
SIGKILLed job is taken over; an output.dir that cannot be written is one line.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from pp.launcher.metrics import read_metrics
from pp.launcher.outdir import LOCK_FILE, OutputDirError, OutputLock, check_usable

from test_launcher_run import REPO, losses, main_in_process, write_config
from test_reliability import Job

STEPS = 20
SLOW_MODEL = '''
import os
import time

import torch
from pp.launcher.models import ResidualMLP


@torch.library.custom_op("preempttest::pause", mutates_args=())
def pause(x: torch.Tensor) -> torch.Tensor:
    """Zero, after sleeping SLOW_S seconds (steps slow enough to be interrupted mid-run), and after the file
    GATE names is gone (a job held mid-run for as long as a test needs)."""
    time.sleep(float(os.environ.get("SLOW_S", "0")))
    gate = os.environ.get("GATE")
    while gate and os.path.exists(gate):
        time.sleep(0.02)
    return torch.zeros((), dtype=x.dtype)


@pause.register_fake
def _(x):
    return x.new_zeros(())


class Slow(ResidualMLP):
    def forward(self, tokens):
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x)
        x = x + pause(x.detach())
        return self.lm_head(self.norm(x))
'''
MODEL = {"name": "slow_model:Slow", "d_model": 32, "n_layers": 4, "seq_len": 32}
ALL_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun --signals-to-handle: passed on to workers


def _slow_job(tmp_path, name: str, *overrides: str, slow_s: float = 0.05, every: int = 0, steps: int = STEPS,
              env: dict | None = None, out: str | None = None) -> tuple[Job, str]:
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    out = out or str(tmp_path / name)
    cfg = write_config(tmp_path / f"{name}.yaml", out, pp=2, steps=steps, every=every, model=MODEL)
    job = Job(cfg, *overrides, pythonpath=str(tmp_path), env={"SLOW_S": str(slow_s), **(env or {})})
    return job, out


def _wait_for_step(job: Job, out: str, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in read_metrics(os.path.join(out, "metrics.jsonl"))):
        assert job.proc.poll() is None and time.monotonic() < deadline, job.log[-4000:]
        time.sleep(0.01)


def _checkpoints(out: str) -> list[int]:
    root = os.path.join(out, "checkpoints")
    return sorted(int(d.split("-")[1]) for d in os.listdir(root) if d.startswith("step-")) if os.path.isdir(root) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job run to the end without interruption (and without the sleeps, which change nothing)."""
    tmp = tmp_path_factory.mktemp("reference")
    job, out = _slow_job(tmp, "ref", slow_s=0)
    assert job.wait() == 0, job.log[-4000:]
    return losses(out)


# SIGUSR1 takes the same path; tests/test_slurm.py's requeue test sends it end to end (batch shell -> workers)
@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_stop_signal_to_torchrun_saves_the_step_in_flight_and_resume_loses_nothing(reference, tmp_path, sig):
    job, out = _slow_job(tmp_path, "run", every=100, env={"PET_SIGNALS_TO_HANDLE": ALL_SIGNALS})
    _wait_for_step(job, out, 5)
    job.proc.send_signal(getattr(signal, sig))
    job.wait()
    done = max(r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl")))
    assert 5 <= done < STEPS, job.log[-3000:]
    assert _checkpoints(out) == [done], (done, _checkpoints(out))   # the newest checkpoint is the last step
    _, line = job.first(f"pp.run: {sig} at step")
    assert line == f"pp.run: {sig} at step {done}: saved checkpoints/step-{done}, exiting", line
    assert "steps redone after restarts: 0" in job.log
    assert not os.path.exists(os.path.join(out, LOCK_FILE))        # released on the way out

    resumed, _ = _slow_job(tmp_path, "run", "--checkpoint.resume", "true", slow_s=0, every=100)
    assert resumed.wait() == 0, resumed.log[-3000:]
    assert f"(step {done}," in resumed.log
    assert losses(out) == reference                                # bitwise, every step once
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["steps_redone"] == 0


def test_on_signal_empty_leaves_the_signal_fatal(tmp_path):
    job, out = _slow_job(tmp_path, "run", "--checkpoint.on_signal", "[]", every=100)
    _wait_for_step(job, out, 3)
    job.proc.send_signal(signal.SIGTERM)
    job.wait()
    assert _checkpoints(out) == [] and "at step" not in job.log.split("SignalException")[0].split("saved")[0]


def test_second_job_on_a_busy_output_dir_stops_at_once_and_touches_nothing(tmp_path):
    gate = tmp_path / "gate"
    gate.write_text("")
    first, out = _slow_job(tmp_path, "run", slow_s=0, every=5, steps=40, env={"GATE": str(gate)})
    deadline = time.monotonic() + 120
    while not any(line.startswith("pp.run: slow_model") for _, line in first.lines):  # training has begun
        assert first.proc.poll() is None and time.monotonic() < deadline, first.log[-4000:]
        time.sleep(0.05)
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    second, _ = _slow_job(tmp_path, "second", slow_s=0, every=5, out=out)
    assert second.wait(120) != 0
    lines = [line for _, line in second.lines if line.startswith("pp.run:") and "FAILED" not in line]
    assert len(lines) == 1, second.log[-3000:]
    assert lines[0].startswith(f"pp.run: output.dir {out!r} is in use by another running pp job "
                               f"(host {socket.gethostname()}, pid "), lines[0]
    assert not re.search(r'File ".*/pp/', second.log), second.log[-3000:]   # torchrun's report only, no pp frame
    assert first.proc.poll() is None, "the second job must not stop the first"
    gate.unlink()
    for n, t in before.items():   # nothing the first job wrote was removed; the second wrote nothing
        assert os.path.exists(os.path.join(out, n)), n
    assert first.wait() == 0, first.log[-3000:]
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == list(range(1, 41))
    assert _checkpoints(out) == [30, 35, 40]                        # checkpoint.keep 3, none removed by the second


HOLDER = '''
import sys, time
from pp.launcher.outdir import OutputLock
OutputLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
'''


def test_lock_of_a_sigkilled_job_is_taken_over_with_a_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputDirError, match="is in use by another running pp job"):
        OutputLock(str(out)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # a one-rank job, pp.run's main in this process: the takeover is rank 0's, before any process-group work
    cfg = write_config(tmp_path / "run.yaml", str(out), pp=1, steps=3, every=0, model={"n_layers": 2})
    code, stdout, stderr = main_in_process(capsys, cfg)
    assert code == 0, stdout + stderr
    line = next((line for line in stdout.splitlines() if line.startswith("pp.run: output.dir")), stdout)
    assert line.startswith(f"pp.run: output.dir {str(out)!r}: took over the lock of a job that is gone "
                           f"(host {socket.gethostname()}, pid {holder.pid}, started "), line


def test_lock_from_another_host_is_live_while_its_heartbeat_is_fresh(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "heartbeat": time.time()}))
    with pytest.raises(OutputDirError, match=r"in use by another running pp job \(host elsewhere, pid 1"):
        OutputLock(str(tmp_path)).acquire()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time() - 3600}))
    lock = OutputLock(str(tmp_path)).acquire()
    assert "took over the lock of a job that is gone (host elsewhere, pid 1" in lock.note
    lock.release()
    assert not path.exists()


def test_unusable_output_dir_is_one_line_and_exit_code_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", "/etc/passwd/run", pp=1, steps=2, every=0)
    code, _, stderr = main_in_process(capsys, cfg)   # refused before training: pp.run's main in this process
    assert code == 2, stderr
    assert stderr.strip() == "pp.run: output.dir '/etc/passwd/run' cannot be used: '/etc/passwd' is a file, " \
                             "not a directory", stderr
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        check_usable(str(tmp_path / "cfg.yaml" / "sub"))


def test_bad_on_signal_is_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", str(tmp_path / "out"), pp=1, steps=2, every=0,
                       extra="")
    code, _, stderr = main_in_process(capsys, cfg, "--checkpoint.on_signal", "SIGKILL")   # in this process
    assert code == 2
    assert stderr.strip() == ("pp.run: bad config: checkpoint.on_signal: SIGKILL cannot be caught; use e.g. "
                              "SIGTERM or SIGUSR1"), stderr


SETTING_UP = '''
import os, signal, sys, time
from pp.launcher.outdir import OutputLock
from pp.launcher.stopping import StopSignals
stop = StopSignals(["SIGTERM"])
lock = OutputLock(sys.argv[1]).acquire()
stop.before_exit.append(lock.release)
os.kill(os.getpid(), signal.SIGTERM)   # as torchrun does to the ranks left after one failed in setup
time.sleep(60)                          # (a rendezvous that never completes)
'''


def test_stop_signal_before_training_began_ends_the_rank_at_once_and_releases_the_lock(tmp_path):
    """Before the loop arms the stop watchdog, a rank has nothing to save and may wait for a peer that
    already failed: the signal ends it at once, with one line, exit code 128 + 15, the lock released."""
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SETTING_UP, str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "RANK": "1"}, timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip() == "pp.run: rank 1: SIGTERM arrived before training began: nothing to save; exiting"
    assert not os.path.exists(os.path.join(out, LOCK_FILE))


def test_ctrl_c_outside_on_signal_is_one_line_without_a_traceback(tmp_path):
    """SIGINT is not in the default checkpoint.on_signal: torchrun passes Ctrl-C on, every rank ends with
    exit code 130, rank 0 says so in one line, no frame of pp's code is printed and the lock is released."""
    job, out = _slow_job(tmp_path, "run", every=100)
    _wait_for_step(job, out, 3)
    job.proc.send_signal(signal.SIGINT)
    job.wait()
    said = [line for _, line in job.lines if line.startswith("pp.run: interrupted")]
    assert said == ["pp.run: interrupted (SIGINT): exiting without saving the step in flight; the newest checkpoint "
                    "is where checkpoint.resume starts (add SIGINT to checkpoint.on_signal to save on Ctrl-C)"], \
        job.log[-3000:]
    assert not re.search(r'File ".*/pp/', job.log), job.log[-3000:]
    assert not os.path.exists(os.path.join(out, LOCK_FILE))


def test_busy_names_a_live_holder_before_start_up_and_creates_nothing(tmp_path):
    """pp.run's rank 0 asks `busy()` before tracing the model, so a second job stops at once."""
    out = tmp_path / "run"
    assert OutputLock(str(out)).busy() is None and not out.exists()
    out.mkdir()
    assert OutputLock(str(out)).busy() is None and os.listdir(out) == []
    held = OutputLock(str(out)).acquire()
    try:
        line = OutputLock(str(out)).busy()
        assert line is not None and line.startswith(f"output.dir {str(out)!r} is in use by another running pp "
                                                     f"job (host {socket.gethostname()}, pid {os.getpid()}"), line
    finally:
        held.release()
    assert OutputLock(str(out)).busy() is None
