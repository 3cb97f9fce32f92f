"""`python -m pp.schedules.show`: draws a PNG, prints one bubble line, and fails with one sentence."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pp.schedules.actions import Action
from pp.schedules.csvio import write_actions
from pp.schedules.registry import build_lists
from pp.schedules.show import draw_timeline, main
from pp.schedules.simulate import TimelineEvent

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pp.schedules.show", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_png_and_prints_the_bubble_line(tmp_path):
    out = tmp_path / "1f1b.png"
    done = run_cli("1F1B", "--ranks", "4", "--microbatches", "8", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1F1B ranks=4 microbatches=8 bubble=0.273\n"
    assert out.read_bytes()[:8] == PNG


def test_cli_unknown_schedule_exits_2_with_one_line(tmp_path):
    done = run_cli("Foo", "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown schedule 'Foo'" in lines[0] and "DualPipeV" in lines[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["1F1B", "--ranks", "0"], "argument --ranks: expected a number >= 1, got 0"),
    (["1F1B", "--microbatches", "many"], "argument --microbatches: expected a whole number, got 'many'"),
    (["1F1B", "--stages-per-rank", "2"], "1F1B runs exactly 1 stage(s) per rank, got stages_per_rank=2"),
    (["ZBVZeroBubble", "--trace", "a.json", "--csv", "b.csv"], "not allowed with argument"),
])
def test_bad_arguments_exit_2_with_one_sentence(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        code = main([*args, "-o", str(tmp_path / "x.png")])
        raise SystemExit(code)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_looped_schedule_takes_stages_per_rank(tmp_path, capsys):
    assert main(["Interleaved1F1B", "--ranks", "2", "--microbatches", "4", "--stages-per-rank", "3",
                 "-o", str(tmp_path / "i.png")]) == 0
    assert capsys.readouterr().out.startswith("Interleaved1F1B ranks=2 microbatches=4 bubble=0.")
    assert (tmp_path / "i.png").read_bytes()[:8] == PNG


def test_csv_schedule_is_validated_and_drawn(tmp_path, capsys):
    _, lists = build_lists("1F1B", 2, 3)
    path = tmp_path / "mine.csv"
    write_actions(lists, path)
    assert main(["mine", "--csv", str(path), "-o", str(tmp_path / "mine.png")]) == 0
    assert capsys.readouterr().out == "mine ranks=2 microbatches=3 bubble=0.250\n"
    path.write_text("0F0,0SEND_F0,0RECV_B0,0B0\n1RECV_F0,1F0,1B0\n")  # rank 1 never sends the gradient
    assert main(["mine", "--csv", str(path), "-o", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "0RECV_B0" in err


def test_trace_is_drawn_with_its_own_bubble(tmp_path, capsys):
    events = [{"name": n, "ph": "X", "ts": ts, "dur": d, "pid": pid, "tid": 0} for n, ts, d, pid in
              [("0F0", 0, 10, 0), ("1F0", 10, 10, 1), ("1B0", 20, 20, 1), ("0B0", 40, 20, 0), ("step", 0, 60, 0)]]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert main(["run", "--trace", str(path), "-o", str(tmp_path / "t.png")]) == 0
    assert capsys.readouterr().out == "run ranks=2 microbatches=1 bubble=0.500\n"


def test_pp_runs_trace_with_a_row_per_rank_reads_the_same(tmp_path, capsys):
    """pp.run's trace.json holds one process with a row (tid) per rank; --trace read the rank from the
    pid, so every action landed on rank 0 (a wrong bubble, or a refusal)."""
    events = [{"name": n, "ph": "X", "ts": ts, "dur": d, "pid": 0, "tid": tid} for n, ts, d, tid in
              [("0F0", 0, 10, 0), ("1F0", 10, 10, 1), ("1B0", 20, 20, 1), ("0B0", 40, 20, 0)]]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert main(["run", "--trace", str(path), "-o", str(tmp_path / "t.png")]) == 0
    assert capsys.readouterr().out == "run ranks=2 microbatches=1 bubble=0.500\n"
    # no label needed (it was a required positional): the run directory's name and the file's
    assert main(["--trace", str(path), "-o", str(tmp_path / "u.png")]) == 0
    assert capsys.readouterr().out == f"{tmp_path.name}-trace ranks=2 microbatches=1 bubble=0.500\n"


def test_draw_timeline_is_importable_and_writes_png(tmp_path):
    events = [TimelineEvent(0, Action.parse("0F0"), 0.0, 1.0), TimelineEvent(1, Action.parse("1I0"), 1.0, 2.0),
              TimelineEvent(1, Action.parse("1W0"), 2.0, 3.0), TimelineEvent(0, Action.parse("0B0"), 2.0, 4.0)]
    draw_timeline(events, tmp_path / "t.png", "hand-made")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("output, message", [
    ("x.txt", "expected a file ending in .png, .pdf, .svg"),
    (".", "is a directory; expected an image file such as"),
])
def test_an_output_it_cannot_draw_to_exits_2_before_drawing(output, message, capsys, tmp_path):
    """`-o x.txt` failed in matplotlib with a traceback; `-o DIR` wrote DIR.png and said nothing."""
    target = str(tmp_path / output)
    assert main(["1F1B", "-o", target]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and target in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
