"""Test ordering for the suite's two workers (pytest-xdist, `-n 2 --dist loadfile` in pyproject.toml):
each file runs whole on one worker (its module fixtures run once), and the files that take longest start
first, so that no long file starts last and runs alone at the end. Durations as `--durations` measured
them on a 2-core machine; a file not listed runs after these, in the usual order."""
from __future__ import annotations

LONGEST_FIRST = [
    "test_launcher_run.py", "test_parallel.py", "test_zero.py", "test_compile.py", "test_hf_launcher.py",
    "test_preemption.py", "test_tune.py", "test_reliability.py", "test_meta_init.py",
    "test_activation_checkpointing.py", "test_precision_copies.py", "test_shapes_contract.py",
    "test_no_grad_regions.py", "test_runtime.py", "test_data.py", "test_token_mean.py", "test_precision.py",
    "test_precision_edges.py", "test_nccl_matching.py", "test_hf_attention.py", "test_slurm.py",
    "test_tp_seed.py", "test_tp.py", "test_step_abort.py", "test_export.py",
]
_RANK = {name: i for i, name in enumerate(LONGEST_FIRST)}


def pytest_collection_modifyitems(session, config, items) -> None:
    """Files in LONGEST_FIRST order, then the rest; tests keep their order within a file."""
    def key(item):
        name = item.path.name
        return _RANK.get(name, len(_RANK))

    items.sort(key=key)   # stable: the order within a file, and among unlisted files, is kept
