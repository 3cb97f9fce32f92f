"""Automatic schedule choice: `python -m pp.tune` and `schedule.name: auto` on 2 CPU ranks, and the
memory estimate and chooser on synthetic costs (no timing is asserted: CPU timings are noise)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pp.launcher.config import ConfigError, load_config
from pp.launcher.validate import validate
from pp.schedules.registry import build_lists
from pp.tune import LayerCost, activation_peaks, choose, rank_plans, simulate_plan
from pp.tune.auto import config_yaml, placeholder, tune
from pp.tune.plan import GIB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(path, out_dir, schedule="auto", extra="") -> str:
    text = ("model: {name: gpt, vocab_size: 256, d_model: 32, n_layers: 4, n_heads: 4, seq_len: 16}\n"
            "parallel: {pp: 2, timeout_s: 120, device: cpu}\n"
            f"schedule: {{name: {schedule}, microbatches: 2{extra}}}\n"
            "train: {steps: 3, batch_size: 4, lr: 0.003, seed: 0, warmup_steps: 1}\n"
            f"output: {{dir: '{out_dir}'}}\n"
            "checkpoint: {every: 0}\n")
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def torchrun(module: str, *args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    proc.log = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


@pytest.fixture
def one_thread():
    """Measuring in this process with one CPU thread, as torchrun gives each rank (the default thread
    count spent most of the time on contention on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pp_tune_prints_a_ranking_and_writes_a_config_that_pp_run_trains(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    out = tmp_path / "tuned.yaml"
    proc = torchrun("pp.tune", cfg, "--out", str(out), "--iters", "1")
    assert proc.returncode == 0, proc.log[-4000:]
    assert "schedule" in proc.stdout and "peak GiB/rank" in proc.stdout and "pp.tune: chose " in proc.stdout
    assert proc.stdout.count("pp.tune: chose") == 1  # rank 0 alone prints
    tuned = load_config(str(out))
    assert tuned.schedule.name != "auto" and 4 % tuned.schedule.microbatches == 0
    assert len(tuned.split.points) == 2 * tuned.schedule.stages_per_rank - 1
    run = torchrun("pp.run", str(out))
    assert run.returncode == 0, run.log[-4000:]
    n = tuned.schedule.microbatches
    assert f"schedule {tuned.schedule.name} with {n} microbatch{'es' * (n != 1)}" in run.stdout
    assert os.path.exists(tmp_path / "run" / "summary.json")


def test_auto_schedule_logs_its_choice_and_records_predicted_and_measured_step_time(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    proc = torchrun("pp.run", cfg)
    assert proc.returncode == 0, proc.log[-4000:]
    assert proc.stdout.count("pp.run: schedule auto chose ") == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["predicted_step_s"] > 0 and summary["measured_step_s"] > 0
    assert summary["step_time_ratio"] == pytest.approx(summary["measured_step_s"] / summary["predicted_step_s"])
    assert summary["tuned"]["schedule"] in proc.stdout and "measured / predicted" in proc.stdout


def test_tuning_with_a_budget_nothing_fits_is_one_config_error(tmp_path, one_thread):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run", extra=", memory_budget_gib: 0.000001"))
    with pytest.raises(ConfigError, match=r"memory_budget_gib=1e-06: the smallest estimate is [0-9.e-]+ GiB per rank"):
        tune(cfg, torch.device("cpu"), 2, iters=1)


def test_auto_refusals_are_one_line_from_the_whole_job(tmp_path):
    """tp > 1 is refused before any rank starts; a budget nothing fits, after measuring, on every rank
    alike: either way one pp.run line (rank 0's), no line from the rank torchrun stops."""
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "new" / "run", extra=", memory_budget_gib: 0.0000001")
    proc = torchrun("pp.run", cfg)
    ours = [line for line in proc.log.splitlines() if line.startswith("pp.run:")]
    assert proc.returncode != 0 and len(ours) == 1 and "no configuration fits" in ours[0], proc.log[-3000:]
    assert not (tmp_path / "new").exists(), "the failed run left the directories it created behind"
    with pytest.raises(ConfigError, match=r"parallel\.tp=2: automatic schedule choice \(pp\.tune, schedule\.name auto\) handles tp=1 only; name a schedule"):
        placeholder(load_config(cfg, ["--parallel.tp", "2"]))


@pytest.mark.parametrize("value", ["-1", "0"])
def test_bad_memory_budget_is_one_config_error(tmp_path, value):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"schedule\.memory_budget_gib=.*expected a positive number of GiB"):
        validate(placeholder(load_config(cfg, ["--schedule.memory_budget_gib", value])), 2)


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_an_out_path_that_cannot_be_written_is_refused_before_measuring(tmp_path, where, monkeypatch, capsys):
    from pp.tune.__main__ import main

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run")
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    out = tmp_path / "d" if where == "directory" else tmp_path / "f" / "tuned.yaml"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([cfg, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = "is a directory; expected the path of a file" if where == "directory" else "is not a directory"
    assert len(err) == 1 and err[0].startswith(f"pp.tune: --out: {out} ") and want in err[0], err


def test_tuned_config_yaml_reads_back_to_the_same_config(tmp_path):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tmp_path / "run", schedule="ZBVMin",
                                   extra=", memory_budget_gib: 3.5"))
    path = tmp_path / "again.yaml"
    path.write_text(config_yaml(cfg, "a header"))
    assert load_config(str(path)) == cfg


def _auto_config(tmp_path, n_layers: int = 4, batch: int = 6, schedule: str = "{name: auto}") -> str:
    path = tmp_path / "auto.yaml"
    path.write_text(f"model: {{name: gpt, vocab_size: 256, d_model: 16, n_layers: {n_layers}, n_heads: 2, seq_len: 8}}\n"
                    f"parallel: {{pp: 2, device: cpu}}\nschedule: {schedule}\n"
                    f"train: {{steps: 1, batch_size: {batch}}}\noutput: {{dir: '{tmp_path / 'run'}'}}\n")
    return str(path)


def test_auto_chooses_the_microbatches_when_none_are_given(tmp_path, one_thread):
    """The default schedule.microbatches (4) was checked against the batch before auto chose its own:
    batch 6 was refused, though auto would pick 1, 2, 3 or 6."""
    cfg = load_config(_auto_config(tmp_path))
    validate(placeholder(cfg), 2)
    result = tune(cfg, torch.device("cpu"), 2, iters=1)
    assert 6 % result.chosen.microbatches == 0
    assert len({p.microbatches for p in result.plans}) > 1


def test_auto_keeps_the_microbatches_given(tmp_path, one_thread):
    """A given schedule.microbatches was silently replaced by auto's choice; now auto chooses the rest."""
    cfg = load_config(_auto_config(tmp_path), ["--schedule.microbatches", "3"])
    result = tune(cfg, torch.device("cpu"), 2, iters=1)
    assert {p.microbatches for p in result.plans} == {3} and result.cfg.schedule.microbatches == 3
    with pytest.raises(ConfigError, match="schedule.microbatches=4 does not divide train.batch_size=6"):
        validate(placeholder(load_config(_auto_config(tmp_path), ["--schedule.microbatches", "4"])), 2)


def test_every_plan_tuning_ranks_is_one_pp_run_takes(tmp_path, one_thread):
    """With one layer, tuning ranked and could choose plans pp.run then refused (DualPipeV's 4 stages on 2
    ranks, stages with nothing to train): every ranked plan now passes pp.run's checks."""
    from pp.tune.auto import with_plan

    cfg = load_config(_auto_config(tmp_path, n_layers=1, batch=4))
    result = tune(cfg, torch.device("cpu"), 2, iters=1)
    assert result.plans
    for plan in result.plans:
        validate(with_plan(cfg, plan), 2)
    assert all(p.stages_per_rank == 1 for p in result.plans)


def test_a_stage_may_begin_at_a_nested_models_final_norm(tmp_path):
    """An HF model's glue after the layers (model.norm, lm_head) was offered as a cut at 'model', the whole
    body, so auto chose a split pp.run refused (stage 0 empty): the cut is the outermost module that
    begins there, and a plan of 4 stages over 3 layers cuts and trains."""
    pytest.importorskip("transformers")
    from pp.launcher.job import prepare
    from pp.tune.auto import with_plan
    from pp.tune.measure import layer_pipe
    from pp.tune.plan import Plan

    path = tmp_path / "cfg.yaml"
    path.write_text("model: {name: 'hf:LlamaForCausalLM', config: {vocab_size: 256, hidden_size: 32, "
                    "intermediate_size: 32, num_hidden_layers: 3, num_attention_heads: 4, num_key_value_heads: 2, "
                    "max_position_embeddings: 32}}\n"
                    f"parallel: {{pp: 2}}\noutput: {{dir: '{tmp_path / 'out'}'}}\n")
    cfg = load_config(str(path))
    _, cuts, names = layer_pipe(cfg, 2)
    assert names[-1] == "<after>" and cuts[-1] == "model.norm", cuts
    plan = Plan("Interleaved1F1B", 2, 2, ("model.layers.1", "model.layers.2", "model.norm"), 0.0, 0.0, (0, 0))
    job = prepare(with_plan(cfg, plan), 2)
    assert job.pipe.num_stages == 4


# --- synthetic costs ------------------------------------------------------------------------------

def layers(n_blocks: int = 8, act_gib: float = 1.0) -> list[LayerCost]:
    """An embedding, `n_blocks` equal blocks (F=1, I=1, W=1, B=2 seconds, `act_gib` held each) and a head."""
    act = int(act_gib * GIB)
    out = [LayerCost("<before>", None, 0.1, 0.2, 0.1, 0.1, 0.0, act // 10, act // 10, 1000, 10)]
    out += [LayerCost(f"blocks.{i}", f"blocks.{i}", 1.0, 2.0, 1.0, 1.0, 0.0, act, act, 1000, 10)
            for i in range(n_blocks)]
    out.append(LayerCost("<after>", "norm", 0.5, 1.0, 0.5, 0.5, 0.0, act, act, 1000, 10))
    return out


def test_activation_count_of_1f1b_is_p_minus_rank_microbatches_in_flight():
    placement, lists = build_lists("1F1B", 4, 8)
    peaks = activation_peaks(lists, dict.fromkeys(range(4), 1), dict.fromkeys(range(4), 1))
    assert peaks == {0: 4, 1: 3, 2: 2, 3: 1}


def test_zbvmin_holds_less_than_zbv_zero_bubble_and_1f1b():
    prof = layers()
    peak = {name: max(simulate_plan(name, prof, 4, 16, v).peak_bytes)
            for name, v in (("1F1B", 1), ("ZBVZeroBubble", 2), ("ZBVMin", 2))}
    assert peak["ZBVMin"] < peak["ZBVZeroBubble"] and peak["ZBVMin"] < peak["1F1B"]


def test_a_tight_budget_picks_a_plan_that_holds_less_memory():
    prof = {1: layers()}
    free = rank_plans(prof, 2, 8, float("inf"))
    best = choose(free, float("inf"))
    least = min(max(p.peak_bytes) for p in free)
    assert max(best.peak_bytes) > least  # the fastest plan is not the leanest one
    budget = (max(best.peak_bytes) + least) / 2
    tight = choose(rank_plans(prof, 2, 8, budget), budget)
    assert max(tight.peak_bytes) <= budget < max(best.peak_bytes)
    assert tight.step_s >= best.step_s


def test_a_budget_nothing_fits_names_the_budget_and_the_smallest_estimate():
    plans = rank_plans({1: layers()}, 2, 8, 0.5 * GIB)
    least = min(max(p.peak_bytes) for p in plans) / GIB
    with pytest.raises(ValueError, match=rf"memory_budget_gib=0\.5: the smallest estimate is {least:.3g} GiB"):
        choose(plans, 0.5 * GIB)


def test_split_is_balanced_by_measured_cost():
    prof = layers(4)
    heavy = [c if c.name != "blocks.0" else LayerCost(**{**c.__dict__, "forward_s": 5.0, "backward_s": 10.0})
             for c in prof]
    assert simulate_plan("1F1B", prof, 2, 4, 1).points == ("blocks.2",)
    assert simulate_plan("1F1B", heavy, 2, 4, 1).points == ("blocks.1",)


def test_simulate_takes_per_stage_costs():
    from pp.schedules.actions import Kind
    from pp.schedules.simulate import simulate

    placement, lists = build_lists("1F1B", 2, 4)
    plain = simulate(lists, placement)
    same = simulate(lists, placement, stage_costs={0: {Kind.F: 1.0, Kind.B: 2.0}, 1: {Kind.F: 1.0}})
    assert [(e.start, e.end) for e in same] == [(e.start, e.end) for e in plain]
    slow = simulate(lists, placement, stage_costs={1: {Kind.F: 3.0, Kind.B: 6.0}})
    assert max(e.end for e in slow) == pytest.approx(1.0 + 4 * 9.0 + 2.0)  # stage 1 sets the pace
    with pytest.raises(ValueError, match=r"stage_costs\[1\] must map F/B/I/W to numbers >= 0"):
        simulate(lists, placement, stage_costs={1: {Kind.F: -1.0}})
