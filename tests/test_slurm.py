"""scripts/slurm/train.sbatch on a real (one-node, localhost) Slurm cluster.

The module fixture brings the cluster up with scripts/slurm_local_cluster.sh (installing Debian's
slurm-wlm and munge with apt the first time) and takes it down afterwards. The jobs run pp.run with
configs/tiny.yaml on 4 CPU ranks (gloo), with this interpreter's virtualenv.

Skipped only when not root or when apt cannot install Slurm; everything else is a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "slurm_local_cluster.sh"
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
TINY = REPO / "configs" / "tiny.yaml"
STATE = os.environ.get("PP_SLURM_STATE", "/tmp/pp-slurm")
EXIT_CANNOT_INSTALL = 3          # slurm_local_cluster.sh: not root, or apt failed
NPROC = 4                        # tiny.yaml: parallel.pp = 4


def _job_env() -> dict[str, str]:
    """This interpreter's environment, with its virtualenv first on PATH, for sbatch --export=ALL."""
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env["PP_PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["SLURM_CONF"] = f"{STATE}/slurm.conf"
    env["PP_NPROC_PER_NODE"] = str(NPROC)
    env.pop("PP_RUN_MODULE", None)
    env.pop("SLURM_JOB_ID", None)    # in case pytest itself runs inside a Slurm job
    return env


def _ctld_running() -> bool:
    try:
        pid = int(Path(STATE, "slurmctld.pid").read_text().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm test installs packages and starts slurmctld/slurmd: it needs root "
                    f"(running as uid {os.geteuid()})")
    probe = subprocess.run([sys.executable, "-c", "import pp.run"], capture_output=True, text=True,
                           env=_job_env(), cwd=REPO)
    if probe.returncode != 0:
        pytest.fail(f"{sys.executable} cannot import pp.run, which train.sbatch launches:\n"
                    f"{probe.stderr.strip()}", pytrace=False)
    was_up = _ctld_running()
    t0 = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=240)
    print(f"slurm_local_cluster.sh up: {time.monotonic() - t0:.1f}s (exit {up.returncode})\n{up.stderr}")
    if up.returncode == EXIT_CANNOT_INSTALL:
        pytest.skip(f"cannot install Slurm here: {up.stderr.strip().splitlines()[-1:]}")
    if up.returncode != 0:
        pytest.fail(f"slurm_local_cluster.sh up failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}",
                    pytrace=False)
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


def _sbatch(tmp: Path, *overrides: str, extra_sbatch: list[str] = (),
            env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """`sbatch --wait train.sbatch configs/tiny.yaml --output.dir TMP/run OVERRIDES`, not waited for."""
    (tmp / "logs").mkdir(exist_ok=True)
    cmd = ["sbatch", "--wait", "--parsable", "--export=ALL", f"--chdir={REPO}", "--job-name=pp-test",
           f"--output={tmp}/logs/%x-%j.out", *extra_sbatch,
           str(SBATCH), str(TINY), "--output.dir", str(tmp / "run"), *overrides]
    return subprocess.Popen(cmd, env={**_job_env(), **(env_extra or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _job_log(tmp: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((tmp / "logs").glob("*.out")))


def _metrics(tmp: Path) -> list[dict]:
    path = tmp / "run" / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _check_trained(tmp: Path, steps: int) -> list[dict]:
    recs = _metrics(tmp)
    got = [r["step"] for r in recs]
    assert got == list(range(1, steps + 1)), f"metrics.jsonl steps {got}, expected 1..{steps} once each"
    first = sum(r["loss"] for r in recs[:3]) / 3
    last = sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first, f"loss did not fall: mean of first 3 steps {first:.4f}, of last 3 {last:.4f}"
    return recs


def test_sbatch_trains_tiny_on_cpu(cluster, tmp_path):
    steps = 12
    t0 = time.monotonic()
    proc = _sbatch(tmp_path, "--train.steps", str(steps), "--checkpoint.every", "6")
    out, err = proc.communicate(timeout=240)
    log = _job_log(tmp_path)
    print(f"sbatch --wait: {time.monotonic() - t0:.1f}s, exit {proc.returncode}\n{log}")
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {err}\njob log:\n{log}"
    assert f"{NPROC} rank(s)" in log and f"python {sys.executable}" in log, log
    _check_trained(tmp_path, steps)
    assert (tmp_path / "run" / "checkpoints" / f"step-{steps}").is_dir()


@pytest.mark.slow  # CI's time budget (two launches): test_sbatch_trains_tiny_on_cpu runs the sbatch path, and
# test_preemption the save-on-signal and exact resume the requeue relies on
def test_requeued_job_resumes_without_losing_a_step(cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@90 sends before the time limit): the workers save
    the step in flight, then the job requeues itself; the second run resumes from exactly that step (no
    step lost, none redone) and the final metrics have every step once."""
    steps, every, interrupt_at = 40, 10, 20
    t0 = time.monotonic()
    proc = _sbatch(tmp_path, "--train.steps", str(steps), "--checkpoint.every", str(every))
    job = None
    try:
        job = proc.stdout.readline().strip().split(";")[0]
        assert job.isdigit(), f"sbatch printed no job id: {job!r} {proc.stderr.read()}"
        before: list[dict] = []
        while time.monotonic() - t0 < 180:
            before = _metrics(tmp_path)
            if len(before) >= interrupt_at or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert len(before) >= interrupt_at, \
            f"job {job} did not reach step {interrupt_at}:\n{_job_log(tmp_path)}"
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=_job_env(), check=True)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job:
                subprocess.run(["scancel", job], env=_job_env())
    log = _job_log(tmp_path)
    print(f"submit to end: {time.monotonic() - t0:.1f}s, exit {proc.returncode}\n{log}")
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {err}\njob log:\n{log}"
    assert f"{NPROC} rank(s)" in log and f"python {sys.executable}" in log, log
    assert "USR1: saving the step in flight, then requeueing" in log, f"the batch shell never got USR1:\n{log}"
    assert re.search(r"restart 1: .*\n.*--checkpoint\.resume true", log), \
        f"the job did not run again with --checkpoint.resume true (it may have finished first):\n{log}"
    m = re.search(r"resumed from \S+ \(step (\d+)", log)
    assert m, f"pp.run did not resume from a checkpoint:\n{log}"
    resumed = int(m.group(1))
    saved = re.search(r"pp\.run: SIGUSR1 at step (\d+): saved checkpoints/step-(\d+), exiting", log)
    assert saved, f"the workers did not save the step in flight on USR1:\n{log}"
    assert int(saved.group(1)) == int(saved.group(2)) == resumed >= interrupt_at, log   # no step lost
    assert "steps redone after restarts: 0" in log, log
    recs = _check_trained(tmp_path, steps)
    # Steps that ran in both runs give the same loss (deterministic on CPU): nothing was lost or redone
    # differently.
    for r in before:
        if r["step"] > resumed:
            assert r["loss"] == pytest.approx(recs[r["step"] - 1]["loss"], rel=1e-5), \
                (r, recs[r["step"] - 1])


@pytest.mark.slow  # the one-node sbatch and requeue runs cover the launcher path under Slurm
def test_two_nodes_rendezvous(cluster, tmp_path):
    """--nodes=2: one torchrun per node, joined by the c10d rendezvous on the first node. The local
    cluster runs a second slurmd on this machine (node `hostname -s`-n2); 2 nodes x 2 CPU ranks."""
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PP_SLURM_NODES": "2"})
    assert up.returncode == 0, f"slurm_local_cluster.sh up with 2 nodes failed:\n{up.stderr}"
    steps = 12
    env_nproc = {"PP_NPROC_PER_NODE": "2"}
    t0 = time.monotonic()
    proc = _sbatch(tmp_path, "--train.steps", str(steps), extra_sbatch=["--nodes=2"], env_extra=env_nproc)
    out, err = proc.communicate(timeout=240)
    log = _job_log(tmp_path)
    print(f"sbatch --wait --nodes=2: {time.monotonic() - t0:.1f}s, exit {proc.returncode}\n{log}")
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {err}\njob log:\n{log}"
    assert "2 node(s) x 2 rank(s)" in log, log
    assert "4 stages on 4 ranks" in log, log
    _check_trained(tmp_path, steps)
