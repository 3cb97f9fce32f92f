"""docs/data.md's prepare -> train -> evaluate flow runs as written, with a tokenizer made locally."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pp.launcher.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # CI's time budget: test_data runs the same prepare -> train -> resume steps by default
def test_docs_data_flow_runs_as_written(tmp_path):
    text = (ROOT / "docs" / "data.md").read_text()
    python = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    commands = re.findall(r"```bash\n(.*?)```", text, re.S)[0].strip().splitlines()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, check=True, timeout=300)
    outputs = []
    for line in commands:
        line = line.replace("$(cat files.txt)", " ".join(shlex.quote(f) for f in (tmp_path / "files.txt").read_text().split("\n")))
        line = line.replace("configs/tiny.yaml", str(ROOT / "configs" / "tiny.yaml"))
        argv = shlex.split(line)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]] if argv[0] == "torchrun" else \
            [sys.executable, *argv[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    assert re.match(r"pp\.data: 40 documents, [\d,]+ tokens \(uint16: set train\.data_dtype: uint16\)", outputs[0])
    assert "decoded: " in outputs[1]
    recs = read_metrics(str(tmp_path / "runs" / "bpe" / "metrics.jsonl"))
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs" / "bpe" / "tensorboard").iterdir())
