"""scripts/bench.py under torchrun (2 gloo ranks, tiny model, 2 timed steps), driven by scripts/bench_all.sh:
both impls give a record with the same loss, a configuration that kills the job is recorded as crashed and
the launch resumes after it, the merged trace draws, and bench_table.py prints the pp/torch table."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "4", "--d-model", "32", "--heads", "2", "--vocab", "64", "--seq", "8", "--mb-size", "1"]


def torch_pipelining_importable() -> bool:
    try:
        import torch.distributed.pipelining  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_bench_suite_both_impls_resume_trace_and_table(tmp_path):
    out = tmp_path / "run"
    suite = "pp:1F1B:4,torch:1F1B:4,pp:ZBVZeroBubble:4:cost,torch:ZBVZeroBubble:4:cost,pp:Interleaved1F1B:4"
    env = {**os.environ, "NPROC": "2", "WARMUP": "1", "STEPS": "2", "SUITE": suite, "BUDGET_S": "100",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PP_BENCH_DIE_ON": "torch/ZBVZeroBubble"}  # rank 1 dies there: the script must resume after it
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "bench_all.sh"), str(out), *TINY], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=110)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    recs = {r["config"].split("/L")[0]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(recs) == sorted(["pp/1F1B/4/even/-", "torch/1F1B/4/even/-", "pp/ZBVZeroBubble/4/cost/-",
                                   "torch/ZBVZeroBubble/4/cost/-", "pp/Interleaved1F1B/4/even/-"]), log[-3000:]
    assert recs["torch/ZBVZeroBubble/4/cost/-"]["status"] == "crashed"
    pp1 = recs["pp/1F1B/4/even/-"]
    for r in (pp1, recs["pp/ZBVZeroBubble/4/cost/-"], recs["pp/Interleaved1F1B/4/even/-"]):
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["ideal_step_time_s"] > 0
        assert 0 < r["balanced_step_time_s"] <= r["ideal_step_time_s"] + 1e-12
        assert r["efficiency"] == pytest.approx(r["ideal_step_time_s"] / r["step_time_s"])
        assert r["peak_mem_gib"] == [None, None] and r["torch"] and r["date"] and r["device"]
        assert r["model"]["d_model"] == 32 and r["microbatches"] == 4 and r["ranks"] == 2
    assert pp1["blocks_per_stage"] == [2, 2] and recs["pp/ZBVZeroBubble/4/cost/-"]["stages"] == 4
    t1 = recs["torch/1F1B/4/even/-"]
    if torch_pipelining_importable():
        assert t1["status"] == "ok", t1
        assert t1["loss"] == pytest.approx(pp1["loss"], rel=1e-5)  # same modules, same split, same inputs
    else:
        assert t1["status"] == "unavailable"

    trace = out / "traces" / "1F1B_mb4.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}
    assert (out / "traces" / "ZBVZeroBubble_mb4_cost.json").exists()
    try:
        import matplotlib  # noqa: F401
        assert (out / "traces" / "1F1B_mb4.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        pass

    table = (out / "table.md").read_text()
    assert "| 1F1B (4) | even |" in table and "| ZBVZeroBubble (4) | cost |" in table
    assert "crashed" in table and "Targets (issue 6):" in table
