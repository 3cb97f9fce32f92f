"""Pipeline × data × tensor parallelism: a (pp, dp, tp) device mesh, data-parallel gradient sync, and
`pp.parallelize`, which puts them together over the pipeline runtime and the tp graph rewrite; with
precision (precision.py), activation checkpointing (checkpointing.py), ZeRO (zero.py) and meta-device
builds (meta.py)."""
from pp.parallel.api import ParallelModel, parallelize
from pp.parallel.checkpointing import apply_checkpointing
from pp.parallel.data_parallel import GradSync
from pp.parallel.mesh import MESH_DIMS, make_mesh, mesh_coords

__all__ = ["apply_checkpointing", "GradSync", "MESH_DIMS", "ParallelModel", "make_mesh", "mesh_coords", "parallelize"]
