"""Tensor parallelism by graph rewrite: shard planned nn.Linear weights, insert the collectives."""
from pp.tp.stage import shard_stage_module
from pp.tp.styles import ColwiseParallel, RowwiseParallel
from pp.tp.transform import tensor_parallel_transformation

__all__ = ["ColwiseParallel", "RowwiseParallel", "shard_stage_module", "tensor_parallel_transformation"]
