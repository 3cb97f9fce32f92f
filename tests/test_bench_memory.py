"""scripts/bench_memory.py (issue 17's memory and speed benchmark) runs every kind of configuration in its
CPU smoke mode: pp with each checkpointing mode, precision and ZeRO level, and torch.distributed.pipelining."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["pp:1F1B:full:bf16-mixed:0:2:1", "pp:ZBVZeroBubble:selective:bf16:0:2:1",
           "torch:1F1B:selective:bf16-mixed:0:2:1", "pp:1F1B:none:bf16-mixed:3:1:2"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_memory_smoke_records_every_configuration(tmp_path):
    out = tmp_path / "memory.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(REPO, "scripts", "bench_memory.py"), "--smoke", "--configs", ",".join(CONFIGS),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in recs] == CONFIGS
    for r in recs:
        assert r["status"] == "ok", r
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and len(r["peak_gib_per_rank"]) == 2
