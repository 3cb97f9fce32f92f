"""`torchrun -m pp.run` end to end on tiny configs: training, logs, checkpoints, resume, other pp degrees.

Each run is a real torchrun job on CPU (gloo). Runs are few and small (CI has 2 cores), and each carries
several assertions.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pp import load_unsplit
from pp.launcher.config import load_config
from pp.launcher.data import ByteBatches, load_corpus
from pp.launcher.metrics import read_metrics
from pp.launcher.models import GPT
from pp.launcher.train import lm_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=256, d_model=32, n_layers=4, n_heads=4, seq_len=32)
BATCH, MICRO = 8, 4


def write_config(path, out_dir, *, pp=4, schedule="1F1B", steps=20, every=10, model=None, extra="") -> str:
    model = model if model and "name" in model else {"name": "gpt", **MODEL, **(model or {})}
    text = (f"model: {json.dumps(model)}\n"
            f"parallel: {{pp: {pp}, timeout_s: 120}}\n"
            f"schedule: {{name: {schedule}, microbatches: {MICRO}}}\n"
            f"train: {{steps: {steps}, batch_size: {BATCH}, lr: 0.003, seed: 0, warmup_steps: 3}}\n"
            f"output: {{dir: '{out_dir}'}}\n"
            f"checkpoint: {{every: {every}, resume: false}}\n" + extra)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def torchrun(nproc: int, cfg: str, *overrides: str, timeout: float = 200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pp.run", cfg, *overrides]
    # CPU ranks over gloo, as every launcher test expects: on a machine with fewer GPUs than ranks,
    # parallel.device auto would (rightly) refuse to start
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    proc.log = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def pp_run(cfg: str, *overrides: str, cwd: str = REPO, pythonpath: str = REPO,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m pp.run` in one process, with one CPU thread as torchrun gives each rank (left to its
    default, a loaded 2-core machine spent seconds per step of a tiny model on thread contention)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-m", "pp.run", cfg, *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def main_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of pp.run's `main(args)` run in this process as a one-rank job: what
    `python -m pp.run` runs, less the interpreter start (seconds of CPU each). Only for runs that end by
    returning: pp.run leaves by os._exit on bad data and when a rank fails. The environment, signal
    handlers, warnings hook, thread count, RNG and pp.run's undo list are put back on return."""
    import signal
    import warnings

    import pp.run
    from pp.testing import _free_port

    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    handlers = {sig: signal.getsignal(sig) for sig in signals}
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())}.items():
            mp.setenv(key, value)
        mp.setattr(pp.run, "_ON_FAIL", [])

        def no_exit(code: int) -> None:   # a run that failed here must fail its test, not end pytest
            raise AssertionError(f"pp.run ended its process with os._exit({code}): run it as a process instead")

        mp.setattr(os, "_exit", no_exit)
        mp.setattr(warnings, "showwarning", warnings.showwarning)
        torch.set_num_threads(1)   # as torchrun gives each rank
        capsys.readouterr()
        try:
            code = pp.run.main(list(args))
        finally:
            torch.set_num_threads(threads)
            torch.random.set_rng_state(rng)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return code, out, err


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))}


def check_ok(proc) -> None:
    assert proc.returncode == 0, proc.log[-4000:]


TINY = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The README's run (configs/tiny.yaml: 4 ranks, 1F1B, checkpoints every 10 steps), cut to 20 steps."""
    out = tmp_path_factory.mktemp("straight") / "out"
    proc = torchrun(4, TINY, "--train.steps", "20", "--output.dir", str(out))
    check_ok(proc)
    return out, proc


def tiny_gpt() -> tuple[GPT, ByteBatches, int]:
    """The unsplit model of configs/tiny.yaml, its data, and its microbatch count."""
    cfg = load_config(TINY)
    m = cfg.model
    model = GPT(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len, m.d_ff, m.tie_weights)
    data = ByteBatches(load_corpus(cfg.train.data), cfg.train.batch_size, m.seq_len, cfg.train.seed)
    return model, data, cfg.schedule.microbatches


def test_1f1b_on_4_ranks_trains_logs_and_checkpoints(straight):
    out, proc = straight
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"step", "loss", "lr", "tokens_per_s", "step_time_s", "grad_norm"} <= set(records[0])
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 5.0 and last < first - 0.8, (first, last)
    assert proc.stdout.count("pp.run: gpt with") == 1  # rank 0 alone talks
    assert "4 stages on 4 ranks (cpu), schedule 1F1B with 4 microbatches" in proc.stdout
    assert "step 1/20 loss" in proc.stdout and "step 20/20 loss" in proc.stdout
    assert "bubble fraction (measured" in proc.stdout and "rank 3: stages [3]" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["ranks"]) == 4 and all(0 <= r["bubble"] < 1 for r in summary["ranks"])
    trace = json.loads((out / "trace.json").read_text())
    assert {e["tid"] for e in trace["traceEvents"]} == {0, 1, 2, 3}
    assert sorted(os.listdir(out / "checkpoints")) == ["step-10", "step-20"]
    from pp.plot import main as plot_main

    assert plot_main([str(out)]) == 0 and (out / "loss.png").exists() and (out / "timeline.png").exists()


def test_resume_from_step_10_gives_the_same_losses_and_skips_a_damaged_checkpoint(straight, tmp_path):
    ref_out, _ = straight
    out = tmp_path / "out"
    ck = out / "checkpoints"
    shutil.copytree(ref_out / "checkpoints" / "step-10", ck / "step-10")
    shutil.copytree(ref_out / "checkpoints" / "step-10", ck / "step-15")   # newer, but damaged below
    manifest = json.loads((ck / "step-15" / "manifest.json").read_text())
    (ck / "step-15" / "manifest.json").write_text(json.dumps({**manifest, "step": 15}))  # a copy's own step
    with open(ck / "step-15" / "__2_0.distcp", "r+b") as f:
        f.write(b"\xff" * 16)
    os.makedirs(ck / ".tmp-step-17")                                       # a save killed mid-way
    shutil.copy(ref_out / "metrics.jsonl", out / "metrics.jsonl")           # records of steps 11..20 get rewritten
    proc = torchrun(4, TINY, "--train.steps", "20", "--output.dir", str(out), "--checkpoint.resume", "true")
    check_ok(proc)
    assert f"checkpoint {ck / 'step-15'} is damaged (file __2_0.distcp does not match its sha256 checksum)" in proc.stdout
    assert f"resumed from {ck / 'step-10'} (step 10" in proc.stdout and "removed .tmp-step-17" in proc.stdout
    # set aside, so checkpoint.keep never counts it among the newest (it once kept it and deleted good ones)
    assert "kept the damaged checkpoint(s) as damaged-step-15" in proc.stdout
    assert (ck / "damaged-step-15" / "__2_0.distcp").is_file() and not (ck / "step-15").exists()
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(1, 21))
    assert losses(out) == losses(ref_out)  # bitwise: same data, RNG, optimizer and LR state
    assert "step 10/20" not in proc.stdout and "step 11/20" in proc.stdout
    assert "learning-rate schedule changed" not in proc.stdout   # the same train.steps: no note


def test_pp4_checkpoint_loads_at_pp2_and_into_the_unsplit_model(straight, tmp_path):
    ref_out, _ = straight
    out = tmp_path / "out"
    shutil.copytree(ref_out / "checkpoints" / "step-10", out / "checkpoints" / "step-10")
    proc = torchrun(2, TINY, "--train.steps", "20", "--output.dir", str(out), "--checkpoint.resume", "true",
                    "--parallel.pp", "2", "--schedule.name", "GPipe")
    check_ok(proc)
    assert "saved with pp=4" in proc.stdout
    ref, got = losses(ref_out), losses(out)
    assert sorted(got) == list(range(11, 21))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
    # the unsplit model from the pp=4 step-10 checkpoint reproduces the pipelined loss of step 11
    model, data, micro = tiny_gpt()
    load_unsplit(model, str(ref_out / "checkpoints" / "step-10"))
    x, y = data.batch(11)
    with torch.no_grad():
        loss = torch.stack([lm_loss(model(a), b) for a, b in zip(x.chunk(micro), y.chunk(micro))]).mean()
    assert loss.item() == pytest.approx(ref[11], rel=1e-6)
    # after 10 more steps at pp=2, the unsplit model agrees with the one trained at pp=4
    other = tiny_gpt()[0]
    load_unsplit(model, str(ref_out))
    load_unsplit(other, str(out))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule, model, extra", [
    # slow: GPipe on 2 ranks trains (step for step like 1F1B) in test_pp4_checkpoint_loads_at_pp2..., and a
    # model.name of module:Class (ResidualMLP subclasses) trains on 2 ranks in test_reliability/test_preemption
    pytest.param("GPipe", {"name": "pp.launcher.models:ResidualMLP", "d_model": 32, "n_layers": 4, "seq_len": 32}, "",
                 marks=pytest.mark.slow),
    ("Interleaved1F1B", {}, "split: {points: [blocks.1, blocks.2, blocks.3]}\n"),
    ("ZBVZeroBubble", {"tie_weights": True}, ""),
], ids=["GPipe-custom-model", "Interleaved1F1B-split-points", "ZBVZeroBubble-tied-weights"])
def test_two_rank_schedules_train(schedule, model, extra, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", out, pp=2, schedule=schedule, steps=8, every=0, model=model, extra=extra)
    profile = schedule == "ZBVZeroBubble"   # output.profile_step: one step under torch.profiler per rank
    proc = torchrun(2, cfg, *(("--output.profile_step", "4") if profile else ()))
    check_ok(proc)
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    assert got[8] < got[1] - 0.3, got
    assert "4 stages on 2 ranks" in proc.stdout or schedule == "GPipe"
    for rank in range(2):
        path = out / "profile" / f"rank{rank}.json"
        assert path.exists() == profile, path
        if profile:
            names = {e.get("name", "") for e in json.loads(path.read_text())["traceEvents"]}
            assert any("AdamW" in n for n in names), sorted(names)[:20]   # the profiled step's optimizer step


def test_bad_config_under_torchrun_is_one_line_from_rank_0(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "out", pp=2)
    proc = torchrun(2, cfg, "--schedule.microbatches", "3")
    assert proc.returncode != 0
    ours = [line for line in proc.log.splitlines() if line.startswith("pp.run:")]
    assert ours == ["pp.run: bad config: schedule.microbatches=3 does not divide train.batch_size=8"]
    assert f'{os.sep}pp{os.sep}' not in "".join(l for l in proc.log.splitlines() if l.lstrip().startswith("File "))


def test_resume_with_another_schedule_length_says_the_learning_rate_schedule_changed(tmp_path, capsys):
    """The LR of every step depends on train.steps (cosine decay over it): resuming a 4-step run's
    checkpoint with train.steps 6 changes the steps after 4, and the resume says so (that a resume with
    the same length says nothing is checked by the resume test above)."""
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "out", pp=1, steps=4, every=2, model={"n_layers": 2})

    def run(*overrides):   # pp.run's main in this process: the notes are what is checked here
        code, out, err = main_in_process(capsys, cfg, *overrides)
        assert code == 0, out + err
        return out

    run()
    longer = run("--checkpoint.resume", "true", "--train.steps", "6")
    assert "resumed from" in longer
    assert ("note: the learning-rate schedule changed since step 4 was saved (train.steps 4 -> 6): the steps "
            "after it follow the new one, not the run that saved it") in longer, longer
    assert "the batches (and dropout)" not in longer   # the same seed, data and batch size
    reseeded = run("--checkpoint.resume", "true", "--train.steps", "8", "--train.seed", "5")
    assert ("note: train.seed 0 -> 5 since step 6 was saved: the batches (and dropout) of the steps after it are "
            "not those the run that saved it would have drawn") in reseeded, reseeded


def test_plain_python_runs_one_rank_and_stops_on_a_non_finite_loss(tmp_path):
    """`python -m pp.run` is a one-rank job; train.nan_check names the step and microbatch, exit code 3."""
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "out", pp=1, steps=6, every=0, model={"n_layers": 2})
    proc = pp_run(cfg, "--train.lr", "1e30", "--train.grad_clip", "0")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pp.run: step ") and "microbatch 0 is not finite" in err[0], err
    assert "1 stage on 1 rank" in proc.stdout and "Traceback" not in proc.stderr


def test_a_fresh_run_that_fails_in_its_first_step_leaves_the_earlier_runs_output(tmp_path, capsys):
    """Token ids past the vocabulary surface in the first batch; the earlier run's checkpoint and metrics
    in the same output.dir must still be there afterwards (a fresh run takes the directory over only once
    its first step is done)."""
    import numpy as np

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", out, pp=1, steps=2, every=2, model={"n_layers": 2})
    code, out_text, err_text = main_in_process(capsys, cfg)   # the earlier run, in this process
    assert code == 0, out_text + err_text
    bad = tmp_path / "bad.bin"
    np.arange(100_000, dtype=np.uint16).tofile(bad)   # ids up to 65535 against a vocabulary of 256
    second = pp_run(cfg, "--train.data", str(bad))   # a process of its own: pp.run ends it by os._exit
    assert second.returncode != 0 and "outside the model's vocabulary" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr and "removed" not in second.stdout, second.stdout
    assert (out / "checkpoints" / "step-2").is_dir()
    assert sorted(losses(out)) == [1, 2]
    # resume with every checkpoint damaged: a fresh start that keeps them aside (starting fresh deleted
    # them once, after its first step)
    data = next((out / "checkpoints" / "step-2").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    code, third, err_text = main_in_process(capsys, cfg, "--checkpoint.resume", "true")
    assert code == 0, third + err_text
    assert "every one is damaged): starting fresh; kept them as damaged-step-2" in third, third
    kept = out / "checkpoints" / "damaged-step-2" / data.name
    assert kept.is_file() and len(kept.read_bytes()) == 100
    assert (out / "checkpoints" / "step-2").is_dir() and sorted(losses(out)) == [1, 2]   # the new run's


USER_MODELS = '''
import torch
import torch.nn as nn


class Boom(nn.Module):
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()
        raise RuntimeError("boom in the constructor")


class Narrow(nn.Module):   # logits of 10 classes for a vocabulary of 256
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab_size, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.emb(x))


class Tupled(Narrow):   # (logits,): a tuple, which the loss cannot read
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()
        self.head = nn.Linear(16, vocab_size)

    def forward(self, x):
        return (self.head(self.emb(x)),)


class Integer(Tupled):
    def forward(self, x):
        return self.head(self.emb(x)).long()


class Empty(nn.Module):
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()

    def forward(self, x):
        return torch.zeros(*x.shape, 256)


class Frozen(Narrow):   # every parameter frozen: nothing to train (it failed inside backward)
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()
        self.head = nn.Linear(16, vocab_size)
        self.requires_grad_(False)


class TwoInputs(Narrow):   # forward(x, y): pp.run calls forward(tokens) (the trace failed inside inspect)
    def forward(self, x, y):
        return self.head(self.emb(x))


class Padded(nn.Module):   # a vocabulary padded to 320 logits: trains (ids stay below 256)
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab_size, 16), nn.Linear(16, 320)

    def forward(self, x):
        return self.head(self.emb(x))


class WithAux(Padded):   # (logits, 0-dim auxiliary loss): the training loss adds it
    def forward(self, x):
        logits = self.head(self.emb(x))
        return logits, 0.01 * logits.float().pow(2).mean()


class NoneAux(Padded):   # (logits, None): passed the check, then failed inside the loss in step 1
    def forward(self, x):
        return self.head(self.emb(x)), None


class NestedAux(Padded):   # (logits, (aux,)): its flat outputs looked like the pair
    def forward(self, x):
        logits = self.head(self.emb(x))
        return logits, (logits.float().pow(2).mean(),)


class BadIndex(nn.Module):   # right shape, fails only on real tensors (in the first step)
    def __init__(self, vocab_size=256, seq_len=32):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab_size, 16), nn.Linear(16, vocab_size)

    def forward(self, x):
        return self.head(self.emb(x))[:, :, [300] * 256]
'''


@pytest.mark.parametrize("name, code, expected", [
    ("Boom", 2, "pp.run: cannot build model.name='usermods:Boom': RuntimeError: boom in the constructor (at "),
    ("Narrow", 2, "returns float32 (2, 32, 10) for a microbatch of token ids shaped (2, 32); pp.run trains a language "
                  "model and needs one floating tensor of logits shaped (batch, seq_len, vocab_size) = (2, 32, 256)"),
    ("Tupled", 2, "returns a tuple of float32 (2, 32, 256) for a microbatch"),   # once crashed in step 1
    ("Integer", 2, "returns int64 (2, 32, 256) for a microbatch"),
    ("Empty", 2, "model.name='usermods:Empty' has no parameters: there is nothing to train"),
    ("TwoInputs", 2, "pp.run calls forward with one tensor of token ids, but TwoInputs.forward(x, y) cannot take it"),
    ("Frozen", 2, "model.name='usermods:Frozen' has no trainable parameters (every one has requires_grad=False)"),
    ("BadIndex", 1, "pp.run: rank 0 failed at step 1: IndexError: index 300 is out of bounds"),
    ("Padded", 0, None),
    ("WithAux", 0, None),
    ("NoneAux", 2, "returns a tuple of float32 (2, 32, 320), NoneType for a microbatch"),
    ("NestedAux", 2, "returns a tuple of float32 (2, 32, 320), float32 () for a microbatch"),
])
def test_a_user_model_that_fails_is_one_line_and_leaves_no_output_dir(tmp_path, name, code, expected,
                                                                       monkeypatch, capsys):
    (tmp_path / "usermods.py").write_text(USER_MODELS)
    out = tmp_path / "runs" / "a"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{name: 'usermods:{name}', vocab_size: 256, seq_len: 32}}\nparallel: {{pp: 1}}\n"
                   f"schedule: {{name: 1F1B, microbatches: 2}}\ntrain: {{steps: 2, batch_size: 4}}\n"
                   f"output: {{dir: '{out}'}}\n")
    if code == 2:   # refused before any process-group work: pp.run's main in this process
        from pp.run import main
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("RANK", "0")
        assert main([str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err   # one line, no traceback
        assert not (tmp_path / "runs").exists()
        return
    if code == 0:   # trains: pp.run's main in this process too
        monkeypatch.syspath_prepend(str(tmp_path))
        got, stdout, stderr = main_in_process(capsys, str(cfg))
        assert got == 0, stdout + stderr
        assert sorted(losses(out)) == [1, 2]
        return
    # fails in step 1: a process of its own (pp.run ends a failed rank by os._exit)
    # (on the CPU: CUDA reports an index out of bounds as a device-side assert, not an IndexError)
    proc = pp_run(str(cfg), "--parallel.device", "cpu", cwd=str(tmp_path), pythonpath=f"{tmp_path}{os.pathsep}{REPO}")
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert expected in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "runs").exists()   # the directories this run created are gone again


def test_a_one_step_run_reports_the_steps_own_throughput_not_the_wall_time(tmp_path, capsys):
    """With no step after the first, throughput fell back to the whole run's wall time (evaluation and
    checkpoint saves included) while still labelled "steps after the first": now it is the step's own
    time, and says it is the first step alone."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", out, pp=1, steps=1, every=1, extra="eval: {every: 1, steps: 20}\n")
    code, stdout, stderr = main_in_process(capsys, cfg)   # a one-rank job, in this process
    assert code == 0, stdout + stderr
    (rec,) = read_metrics(str(out / "metrics.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["throughput_over"].startswith("the first step alone")
    assert summary["tokens_per_s"] == pytest.approx(BATCH * MODEL["seq_len"] / rec["step_time_s"], rel=1e-6)
    assert "(the first step alone, warm-up included: no later step ran)" in stdout
