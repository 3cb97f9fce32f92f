"""Reliability with real processes and real faults: a worker SIGKILLed under `torchrun --max-restarts 1`,
a rank raising mid-step, a rank that hangs, a save killed half-way, a stage fed the wrong tensors.

The torchrun jobs use 2 CPU ranks and the small GPT of test_launcher_run; faults come from outside (signals)
or from a model class written here (a custom op that raises or sleeps at a chosen forward call), never
from hooks in pp.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.launcher import checkpoint as ckpt
from pp.launcher.metrics import read_metrics
from pp.testing import RankError, run_ranks

from test_launcher_run import REPO, losses, write_config

STEPS, EVERY = 20, 5


class Job:
    """A torchrun job in the background; every output line is kept with the time it arrived."""

    def __init__(self, cfg: str, *overrides: str, nproc: int = 2, restarts: int = 0, pythonpath: str = "",
                 env: dict | None = None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={restarts}", "-m", "pp.run", cfg, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, REPO])),
               **(env or {})}
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.ended = time.monotonic()
        self._reader.join(10)
        return code

    @property
    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, prefix: str) -> tuple[float, str]:
        """(arrival time, line) of the first line starting with `prefix`."""
        found = [(t, line) for t, line in self.lines if line.startswith(prefix)]
        assert found, f"no line starts with {prefix!r} in:\n{self.log[-4000:]}"
        return found[0]

    def workers(self) -> dict[int, int]:
        """{rank: pid} of the agent's live worker processes (its children), read from /proc."""
        out = {}
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except (OSError, ValueError, IndexError):
                continue
            if b"RANK" in env:
                out[int(env[b"RANK"])] = pid
        return out


def _config(tmp_path, name: str = "cfg.yaml", model: dict | None = None, every: int = EVERY) -> tuple[str, str]:
    out = str(tmp_path / "out")
    return write_config(tmp_path / name, out, pp=2, steps=STEPS, every=every, model=model), out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 20 steps without faults, asked to resume from an output dir that has no checkpoint."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg, out = _config(tmp)
    job = Job(cfg, "--checkpoint.resume", "true")
    assert job.wait() == 0, job.log[-4000:]
    return out, job


def test_resume_with_no_checkpoint_starts_fresh_and_says_so(uninterrupted):
    out, job = uninterrupted
    assert f"no checkpoint in {os.path.join(out, 'checkpoints')}: starting fresh" in job.log
    assert sorted(losses(out)) == list(range(1, STEPS + 1))


def test_worker_sigkilled_after_step_12_restarts_from_newest_checkpoint_with_the_same_losses(uninterrupted, tmp_path):
    ref_out, _ = uninterrupted
    cfg, out = _config(tmp_path)
    metrics = os.path.join(out, "metrics.jsonl")
    job = Job(cfg, restarts=1)
    deadline = time.monotonic() + 180
    while not any(r["step"] >= 12 for r in read_metrics(metrics)):
        assert job.proc.poll() is None and time.monotonic() < deadline, job.log[-4000:]
        time.sleep(0.005)
    os.kill(job.workers()[0], signal.SIGKILL)  # rank 0: it also writes metrics.jsonl and checkpoint manifests
    before = [r["step"] for r in read_metrics(metrics)]
    assert job.wait() == 0, job.log[-4000:]

    killed_after = max(before)
    assert 12 <= killed_after < STEPS, f"the kill came after step {killed_after}"
    # the newest checkpoint complete at the kill: step-15 only if its save had finished
    newest = {(killed_after // EVERY) * EVERY} | ({killed_after - EVERY} if killed_after % EVERY == 0 else set())
    assert "torchrun restart 1: resuming from the newest checkpoint" in job.log
    resumed = [s for s in newest if f"resumed from {os.path.join(out, 'checkpoints', f'step-{s}')} (step {s}," in job.log]
    assert resumed, job.log[-4000:]
    assert before[-1] > resumed[0]  # records of steps after the checkpoint were written, then run again
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, STEPS + 1))  # every step once, in its final form
    assert losses(out) == losses(ref_out)  # bitwise: same data, RNG, optimizer and LR state


FAULTY_MODEL = '''
import os
import time

import torch
from pp.launcher.models import ResidualMLP

_calls = [0]


@torch.library.custom_op("reltest::tripwire", mutates_args=())
def tripwire(x: torch.Tensor) -> torch.Tensor:
    """Zero, except at forward call FAULT_AT of this process: then raise, or hang with FAULT=hang."""
    _calls[0] += 1
    if _calls[0] == int(os.environ["FAULT_AT"]):
        if os.environ.get("FAULT") == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault at forward call {_calls[0]}")
    return torch.zeros((), dtype=x.dtype)


@tripwire.register_fake
def _(x):
    return x.new_zeros(())


class Faulty(ResidualMLP):
    """ResidualMLP whose last stage runs the tripwire (a custom op survives torch.export; Python would not)."""

    def forward(self, tokens):
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x)
        x = x + tripwire(x.detach())
        return self.lm_head(self.norm(x))
'''


def _faulty_job(tmp_path, fault: str, timeout_s: float) -> Job:
    (tmp_path / "faulty_model.py").write_text(FAULTY_MODEL)
    model = {"name": "faulty_model:Faulty", "d_model": 32, "n_layers": 4, "seq_len": 32}
    cfg, _ = _config(tmp_path, model=model, every=0)
    # 4 microbatches per step: forward call 10 of the last stage is step 3, microbatch 1
    return Job(cfg, "--parallel.timeout_s", str(timeout_s), pythonpath=str(tmp_path),
               env={"FAULT": fault, "FAULT_AT": "10"})


def test_rank_raising_mid_step_ends_the_job_at_once_naming_rank_and_error(tmp_path):
    job = _faulty_job(tmp_path, "raise", timeout_s=60)
    assert job.wait() != 0
    t_fail, line = job.first("pp.run: rank 1 failed")
    assert line == ("pp.run: rank 1 failed at step 3: RuntimeError: injected fault at forward call 10 "
                    "(while running 1F1 (stage 1, microbatch 1) on pipeline rank 1)"), line
    _, peer = job.first("pp.run: rank 0")
    # the failed rank leaves a line in the store: the waiting rank names it (pp.comms.abort)
    assert peer.startswith("pp.run: rank 0 stopped at step 3: rank 1 failed with RuntimeError: injected fault "
                           "at forward call 10; rank 0 stopped waiting in "), peer
    assert sum(line.startswith("pp.run: rank") for _, line in job.lines) == 2
    assert job.ended - t_fail < 15, "the job must not wait for parallel.timeout_s=60 when a rank has failed"
    root_cause = job.log.split("Root Cause", 1)[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause  # torchrun blames the rank that failed


def test_hanging_rank_ends_the_job_after_parallel_timeout_s(tmp_path):
    """A rank stuck in its forward (a lost peer to the others): the waiting rank gives up after timeout_s.

    A SIGSTOP-ed rank ends the same way, but torchrun then waits its own 30 s before SIGKILL-ing the stopped
    process (SIGTERM stays pending), too long for CI; a sleeping rank dies at the SIGTERM.
    """
    timeout_s = 6
    job = _faulty_job(tmp_path, "hang", timeout_s=timeout_s)
    assert job.wait() != 0
    t_step2, _ = job.first("step 2/20")
    _, line = job.first("pp.run: rank 0")
    assert line.startswith(f"pp.run: rank 0 stopped at step 3: no message from a peer rank within "
                           f"parallel.timeout_s={timeout_s}s"), line
    assert "Timed out" in line
    # torchrun SIGTERMs rank 1, stuck in its step: it cannot stop at a step boundary, so it says why and ends
    _, line1 = job.first("pp.run: rank 1")
    assert line1.startswith("pp.run: rank 1 at step 3: SIGTERM arrived but training cannot stop at a step "
                            "boundary: rank 0 failed with "), line1
    assert "Timed out" in line1, line1
    assert line1.endswith("exiting without a checkpoint"), line1
    assert timeout_s - 1 < job.ended - t_step2 < timeout_s + 15, job.ended - t_step2


SAVER = '''
import sys, torch
from pp.launcher import checkpoint as ckpt
root = sys.argv[1]
for step in range(1, 1000):
    state = {"model": {f"w{i}": torch.full((1 << 20,), float(step)) for i in range(12)}}
    ckpt.save(root, step, state, {"pp": 1}, keep=2)
'''


def test_save_killed_half_way_leaves_the_previous_checkpoint_complete_and_loadable(tmp_path):
    root = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline = time.monotonic() + 120
        while True:  # kill while a save after the first is under way: its .tmp dir holds some files
            assert proc.poll() is None and time.monotonic() < deadline
            tmp = [n for n in os.listdir(root) if n.startswith(".tmp-step-")] if root.exists() else []
            if tmp and tmp[0] != ".tmp-step-1" and os.listdir(root / tmp[0]):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    partial = int(tmp[0].rsplit("-", 1)[1])
    assert (root / tmp[0]).exists() and not (root / f"step-{partial}").exists()
    logged: list[str] = []
    latest = ckpt.find_latest(str(root), log=logged.append)
    assert latest == ckpt.step_dir(str(root), partial - 1) and logged == []
    state = {"model": {f"w{i}": torch.zeros(1 << 20) for i in range(12)}}
    ckpt.load(latest, state)
    assert all(bool((t == partial - 1).all()) for t in state["model"].values())
    assert ckpt.remove_partial_saves(str(root)) == [tmp[0]]


# --- a stage fed tensors other than it expects (manual stages, 2 gloo ranks) ---------------------------

def _mismatch(rank, world, declared_shape, declared_dtype):
    torch.manual_seed(0)
    if rank == 0:
        stage = pp.PipelineStage(nn.Linear(4, 8), 0, 2, "cpu")
    else:
        stage = pp.PipelineStage(nn.Linear(6, 3), 1, 2, "cpu",
                                 input_args=(torch.empty(declared_shape, dtype=declared_dtype),))
    sched = pp.ScheduleGPipe(stage, 2, loss_fn=F.mse_loss)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    return True


@pytest.mark.parametrize("shape, dtype, expected", [
    ((2, 6), torch.float32, "expected a float32 tensor of shape (*, 6), got a float32 tensor of shape (2, 8)"),
    ((2, 8), torch.float64, "expected a float64 tensor of shape (*, 8), got a float32 tensor of shape (2, 8)"),
], ids=["shape", "dtype"])
def test_received_tensor_of_another_shape_or_dtype_is_named(shape, dtype, expected):
    with pytest.raises(RankError) as info:
        run_ranks(_mismatch, 2, shape, dtype, timeout_s=60)
    assert info.value.rank == 1 and info.value.exc_type == "ValueError"
    assert info.value.exc_message == f"stage 1 input 0 (from stage 0): {expected}"


def test_stop_signal_in_a_step_that_never_ends_exits_after_the_grace_period():
    """No peer failure posted, the step just never ends: the signal ends the rank after grace_s, with a line."""
    code = ("import os, signal, time\n"
            "from pp.launcher.stopping import StopSignals\n"
            "s = StopSignals(['SIGTERM'])\n"
            "s.arm(1.0, lambda: None, lambda: 'rank 0 at step 7')\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(60)\n")
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert time.monotonic() - t < 30
    assert proc.stderr.strip() == ("pp.run: rank 0 at step 7: SIGTERM arrived but training cannot stop at a step "
                                   "boundary: its step did not end within parallel.timeout_s=1s (a peer rank may "
                                   "hang); exiting without a checkpoint"), proc.stderr
