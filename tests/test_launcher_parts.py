"""Launcher pieces that need no process group: models, data, LR schedule, metrics, progress, plot."""
from __future__ import annotations

import io
import json
import math

import torch

from pp.launcher.config import load_config
from pp.launcher.data import ByteBatches, load_corpus, stdlib_files
from pp.launcher.metrics import (METRICS, BubbleMeter, MetricsWriter, chrome_trace, normalize_event, read_metrics,
                                 summary_lines)
from pp.launcher.models import GPT, ResidualMLP, build_model
from pp.launcher.progress import Progress, log_line
from pp.launcher.train import lm_loss, lr_at


def test_gpt_is_causal_and_ties_weights_on_request():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, d_model=32, n_layers=2, n_heads=4, seq_len=16)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    out_x, out_y = model(x), model(y)
    assert out_x.shape == (2, 16, 256)
    torch.testing.assert_close(out_x[:, :10], out_y[:, :10])  # later tokens do not change earlier outputs
    tied = GPT(n_layers=1, tie_weights=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert ResidualMLP(d_model=16, n_layers=2)(x).shape == (2, 16, 256)


def test_build_model_is_deterministic_and_takes_custom_classes(tmp_path):
    cfg = load_config(None, ["--model.d_model", "32", "--model.n_layers", "2"]).model
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: 'pp.launcher.models:ResidualMLP', d_model: 8, n_layers: 3, seq_len: 12}\n")
    custom = load_config(str(path)).model
    model = build_model(custom, seed=0)
    assert isinstance(model, ResidualMLP) and len(model.blocks) == 3 and custom.seq_len == 12
    assert build_model(cfg, 0, torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_stdlib_corpus_and_batches_depend_only_on_seed_and_step():
    assert len(stdlib_files()) > 50 and stdlib_files() == sorted(stdlib_files())
    corpus = load_corpus("stdlib")
    assert corpus.dtype == torch.uint8 and corpus.numel() > 1_000_000
    a = ByteBatches(corpus, batch_size=4, seq_len=16, seed=1)
    b = ByteBatches(corpus, batch_size=4, seq_len=16, seed=1)
    x5, y5 = a.batch(5)
    assert torch.equal(x5, b.tokens(5)) and torch.equal(y5, b.targets(5))
    assert not torch.equal(x5, a.tokens(6))
    assert torch.equal(x5[:, 1:], y5[:, :-1]) and x5.dtype == torch.long and x5.shape == (4, 16)


def test_text_file_corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 10)
    corpus = load_corpus(str(path))
    assert bytes(corpus[:5].tolist()) == b"hello"


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = load_config(None, ["--train.steps", "100", "--train.lr", "1.0", "--train.warmup_steps", "10",
                             "--train.min_lr_ratio", "0.1"])
    assert lr_at(1, cfg) == 0.1 and lr_at(10, cfg) == 1.0
    assert lr_at(50, cfg) < lr_at(20, cfg)
    assert math.isclose(lr_at(100, cfg), 0.1)


def test_lm_loss_is_mean_cross_entropy():
    logits = torch.zeros(2, 3, 256)
    assert math.isclose(lm_loss(logits, torch.zeros(2, 3, dtype=torch.long)).item(), math.log(256), rel_tol=1e-6)


def test_metrics_resume_keeps_only_earlier_steps(tmp_path):
    w = MetricsWriter(str(tmp_path), done_steps=0)
    for s in range(1, 6):
        w.write({"step": s, "loss": float(s)})
    w.close()
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    w = MetricsWriter(str(tmp_path), done_steps=3)
    w.write({"step": 4, "loss": 40.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / METRICS))] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsWriter(str(tmp_path), done_steps=0).close()  # a fresh run that failed before its first step
    assert len(read_metrics(str(tmp_path / METRICS))) == 4   # left the earlier run's records alone
    w = MetricsWriter(str(tmp_path), done_steps=0)          # a fresh run's first record replaces them
    w.write({"step": 1, "loss": 9.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / METRICS))] == [(1, 9.0)]


def test_bubble_fraction_and_chrome_trace():
    events = [{"action": "0F0", "start": 0.0, "end": 1.0}, {"action": "0SEND_F0", "start": 1.0, "end": 1.5},
              {"action": "0B0", "start": 2.0, "end": 3.0}]
    meter = BubbleMeter()
    meter.add_step(events, wall_s=4.0)
    assert math.isclose(meter.fraction(), 0.5)
    assert normalize_event({"name": "1W3", "start": 1.0, "dur": 0.5})["end"] == 1.5
    chrome = normalize_event({"name": "1W3", "ph": "X", "ts": 2e6, "dur": 5e5})
    assert (chrome["start"], chrome["end"], chrome["compute"]) == (2.0, 2.5, True)
    trace = chrome_trace({0: meter.last_events})
    assert [e["name"] for e in trace["traceEvents"]] == ["0F0", "0SEND_F0", "0B0"]
    assert trace["traceEvents"][2]["ts"] == 2e6 and trace["traceEvents"][1]["cat"] == "comm"
    assert BubbleMeter().fraction() is None


def test_progress_plain_lines_and_tty_bar():
    out = io.StringIO()
    p = Progress(total=4, first_step=1, log_every=2, stream=out, tty=False)
    for s in range(1, 5):
        p.update(s, 4.0 - s * 0.1, 3e-3, 12345.0, 0.21)
    lines = out.getvalue().splitlines()
    assert lines == [log_line(s, 4, 4.0 - s * 0.1, 3e-3, 12345.0, 0.21) for s in (1, 2, 4)]
    assert lines[0] == "step 1/4 loss 3.9000 lr 3.0e-03 12.3k tok/s 0.21s"
    bar = io.StringIO()
    p = Progress(total=4, first_step=1, log_every=1, stream=bar, tty=True)
    p.update(2, 3.5, 1e-3, 999.0, 0.1)
    p.print("saved")
    p.close()
    text = bar.getvalue()
    assert "2/4 [" in text and "loss 3.5000" in text and "saved\n" in text, text


def test_plot_writes_loss_and_timeline_pngs(tmp_path):
    from pp.plot import main as plot_main

    with open(tmp_path / METRICS, "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5.0 - s * 0.3, "lr": 1e-3}) + "\n")
    meter = BubbleMeter()
    meter.add_step([{"action": "0F0", "start": 0.0, "end": 0.001}, {"action": "0B0", "start": 0.002, "end": 0.004}], 0.005)
    with open(tmp_path / "trace.json", "w") as f:
        json.dump(chrome_trace({0: meter.last_events, 1: meter.last_events}), f)
    assert plot_main([str(tmp_path)]) == 0
    for name in ("loss.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_plot_says_in_one_line_when_it_cannot_write_the_loss_png(tmp_path, capsys):
    """A directory where loss.png goes gave an IsADirectoryError traceback."""
    from pp.plot import main as plot_main

    (tmp_path / METRICS).write_text(json.dumps({"step": 1, "loss": 5.0, "lr": 1e-3}) + "\n")
    (tmp_path / "loss.png").mkdir()
    assert plot_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pp.plot: cannot write {tmp_path / 'loss.png'}: Is a directory"], err


def test_summary_names_graph_replays_per_rank_only_where_there_were_any():
    ranks = [{"rank": 0, "stages": [0], "bubble": 0.25, "peak_mem_gib": 1.5, "graph_replays": 352},
             {"rank": 1, "stages": [1], "bubble": None, "peak_mem_gib": 1.0}]
    lines = summary_lines(10, 40960, 2.0, 20480.0, ranks, "cuda")
    assert lines[-2] == "  rank 0: stages [0], bubble 25.0%, peak GPU memory 1.50 GiB, 352 forwards replayed as CUDA graphs"
    assert lines[-1] == "  rank 1: stages [1], bubble n/a, peak GPU memory 1.00 GiB"


def test_plot_refuses_what_is_not_a_run_directory_in_one_line(tmp_path, capsys):
    from pp.plot import main

    assert main([str(tmp_path / "missing")]) == 2 and "is not a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2 and "holds no metrics.jsonl" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "usage" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 0.1, "tokens_per_s": 1.0,
                                                        "step_time_s": 1.0}) + "\n")
    (tmp_path / "trace.json").write_text("garbage")   # once a JSONDecodeError traceback
    assert main([str(tmp_path)]) == 0 and (tmp_path / "loss.png").exists()
    assert "trace.json is not a Chrome trace pp.run wrote" in capsys.readouterr().err
    (tmp_path / "trace.json").write_text('{"traceEvents": []}')   # once a blank timeline.png without a word
    assert main([str(tmp_path)]) == 0 and not (tmp_path / "timeline.png").exists()
    assert "holds no complete events" in capsys.readouterr().err
