"""The (pp, dp, tp) DeviceMesh: tp innermost, so the ranks of a tensor-parallel group are neighbours
(one host, the fastest links), and pp outermost, so pipeline neighbours may sit on different hosts."""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from pp.comms.backend import default_backend, get_world_size, init_mesh, is_initialized

__all__ = ["MESH_DIMS", "make_mesh", "mesh_coords"]

MESH_DIMS = ("pp", "dp", "tp")


def make_mesh(pp: int, dp: int = 1, tp: int = 1, device_type: str | None = None) -> DeviceMesh:
    """A mesh of shape (pp, dp, tp) named `MESH_DIMS` over the default group: global rank
    r = (pp_rank * dp + dp_rank) * tp + tp_rank. `device_type` defaults to the group's device."""
    for name, value in (("pp", pp), ("dp", dp), ("tp", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not is_initialized():
        raise RuntimeError("make_mesh needs torch.distributed initialised first "
                           "(e.g. pp.comms.backend.init_process_group_from_env())")
    world = get_world_size()
    if pp * dp * tp != world:
        raise ValueError(f"pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} ranks, but the world size is {world}")
    if device_type is None:
        device_type = "cuda" if "nccl" in default_backend() else "cpu"
    return init_mesh(device_type, (pp, dp, tp), MESH_DIMS)


def check_mesh(mesh: DeviceMesh) -> None:
    """TypeError/ValueError unless `mesh` is a DeviceMesh with exactly the dims `MESH_DIMS`."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch DeviceMesh (see pp.parallel.make_mesh), got {type(mesh).__name__}")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"mesh must have dims named {MESH_DIMS} in this order (pp.parallel.make_mesh makes "
                         f"one), got {mesh.mesh_dim_names}")


def mesh_coords(mesh: DeviceMesh) -> dict[str, int]:
    """This rank's index along each dim: {"pp": ..., "dp": ..., "tp": ...}."""
    check_mesh(mesh)
    return {name: mesh.get_local_rank(name) for name in MESH_DIMS}
