"""The TP test cases (tests/test_tp.py) on 2 GPUs over NCCL: collective counts and max error per case.

`python scripts/tp_check.py` on a machine with 2 GPUs; exits non-zero on any mismatch.
"""
from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pp.testing import run_ranks  # noqa: E402


def main() -> int:
    import test_tp

    warnings.simplefilter("ignore")
    cases, irs = test_tp.RUNS[2]
    out = run_ranks(test_tp._run_cases, 2, cases, irs, "cuda", backend="nccl", timeout_s=300)
    bad = 0
    for rank, seen in enumerate(out):
        for key, (counts, err, _shapes) in sorted(seen.items()):
            print(f"rank {rank} {key}: collectives {counts} max|err| {err:.2e}")
            bad += err >= 1e-4
    print("TP on NCCL: all cases match" if not bad else f"TP on NCCL: {bad} case(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
