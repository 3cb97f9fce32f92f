"""The README's examples run as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_splitter_example_runs():
    exec(compile(_python_blocks()[0], "README.md", "exec"), {})


def test_readme_two_rank_example_is_the_example_file_and_trains():
    block = _python_blocks()[1]
    source = (ROOT / "examples" / "two_ranks.py").read_text()
    for line in block.strip().splitlines():
        if line.startswith("import torch, torch.nn as nn"):
            continue  # the README folds three imports into one line
        assert line.strip() in source, f"README line not in examples/two_ranks.py: {line}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          str(ROOT / "examples" / "two_ranks.py")], capture_output=True, text=True,
                         env=env, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 20 and losses[-1] < losses[0] / 2
