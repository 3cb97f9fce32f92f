"""pp.comms.collectives: right values over the world and over a DeviceMesh dim, graph nodes when traced,
and the in-place bucketed gradient all-reduce. One 4-rank run checks everything (ranks cost seconds)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pp.comms import collectives as C
from pp.testing import run_ranks


def _check_world(rank: int, ws: int) -> None:
    t = torch.arange(6.0).reshape(2, 3) + 10 * rank
    total = sum(torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(ws))
    torch.testing.assert_close(C.all_reduce(t), total)
    torch.testing.assert_close(C.all_reduce(t, "avg"), total / ws)
    torch.testing.assert_close(C.all_reduce(t, "max"), t - 10 * rank + 10 * (ws - 1))
    assert torch.equal(t, torch.arange(6.0).reshape(2, 3) + 10 * rank), "input must be left unchanged"

    shards = [torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(ws)]
    torch.testing.assert_close(C.all_gather(t), torch.cat(shards, 0))
    torch.testing.assert_close(C.all_gather(t, dim=-1), torch.cat(shards, 1))
    torch.testing.assert_close(C.all_gather(t.t(), dim=1), torch.cat([s.t() for s in shards], 1))

    full = torch.arange(float(ws * 2 * ws)).reshape(ws * 2, ws) * (rank + 1)
    factor = sum(r + 1 for r in range(ws))
    expected = torch.arange(float(ws * 2 * ws)).reshape(ws * 2, ws) * factor
    torch.testing.assert_close(C.reduce_scatter(full), expected.chunk(ws, 0)[rank])
    torch.testing.assert_close(C.reduce_scatter(full, dim=1), expected.chunk(ws, 1)[rank])
    torch.testing.assert_close(C.reduce_scatter(full, op="avg"), expected.chunk(ws, 0)[rank] / ws)

    torch.testing.assert_close(C.broadcast(torch.full((3,), float(rank)), src=2), torch.full((3,), 2.0))
    assert C.group_name() == str(dist.group.WORLD.group_name) and C.group_size() == ws


def _check_mesh(rank: int, ws: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("dp", "tp"))
    tp_ranks = [int(r) for r in mesh["tp"].mesh.flatten()]  # this rank's tp group, in group order
    t = torch.tensor([float(rank)])
    for group in ((mesh, "tp"), (mesh, 1), mesh.get_group("tp")):
        torch.testing.assert_close(C.all_reduce(t, group=group), torch.tensor([float(sum(tp_ranks))]))
        torch.testing.assert_close(C.all_gather(t, group=group), torch.tensor([float(r) for r in tp_ranks]))
        # src counts within the group: group rank 1 is global rank tp_ranks[1]
        torch.testing.assert_close(C.broadcast(t, src=1, group=group), torch.tensor([float(tp_ranks[1])]))
    assert C.group_size((mesh, "dp")) == 2
    assert C.group_name((mesh, "tp")) == str(mesh.get_group("tp").group_name)


def _check_traced(rank: int, ws: int) -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        return C.reduce_scatter(C.all_gather(C.all_reduce(x), dim=1), dim=1) + C.broadcast(x)

    x = torch.ones(2, 4)
    gm = make_fx(f)(x)
    targets = [str(n.target) for n in gm.graph.nodes if "_c10d_functional" in str(n.target)]
    assert targets == [
        "_c10d_functional.all_reduce.default", "_c10d_functional.wait_tensor.default",
        "_c10d_functional.all_gather_into_tensor.default", "_c10d_functional.wait_tensor.default",
        "_c10d_functional.reduce_scatter_tensor.default", "_c10d_functional.wait_tensor.default",
        "_c10d_functional.broadcast.default", "_c10d_functional.wait_tensor.default",
    ], targets
    torch.testing.assert_close(gm(x), f(x))


def _check_inplace(rank: int, ws: int) -> None:
    def tensors():
        g = torch.Generator().manual_seed(rank)
        return [torch.randn(5, generator=g), torch.randn(3, 4, generator=g).t(),  # non-contiguous
                torch.randn(64, generator=g), torch.randn(2, generator=g).double(),
                torch.empty(0), torch.randn(7, generator=g)]

    expected = [torch.zeros_like(t) for t in tensors()]
    for r in range(ws):
        g = torch.Generator().manual_seed(r)
        parts = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g).t(),
                 torch.randn(64, generator=g), torch.randn(2, generator=g).double(),
                 torch.empty(0), torch.randn(7, generator=g)]
        expected = [e + p for e, p in zip(expected, parts)]
    for op, bucket_bytes, scale in (("sum", 25 * 2**20, 1), ("avg", 200, ws)):
        ts = tensors()
        handles = C.all_reduce_(ts, op=op, bucket_bytes=bucket_bytes)
        for h in handles:
            h.wait()
        for got, want in zip(ts, expected):
            torch.testing.assert_close(got, want / scale)
    assert len(C.all_reduce_(tensors(), bucket_bytes=200)) > 2  # small buckets: several collectives


def _all_checks(rank: int, ws: int) -> None:
    _check_world(rank, ws)
    _check_mesh(rank, ws)
    _check_traced(rank, ws)
    _check_inplace(rank, ws)


def test_collectives_values_mesh_groups_tracing_and_inplace_on_four_ranks():
    run_ranks(_all_checks, 4, timeout_s=150)


@pytest.mark.parametrize("call, message", [
    (lambda: C.all_reduce(torch.ones(2), op="mean"), r"op must be one of .* got 'mean'"),
    (lambda: C.all_gather(torch.ones(2), dim=3), r"dim 3 is out of range for a tensor of shape \(2,\)"),
    (lambda: C.resolve_group("tp"), r"group must be a ProcessGroup, None or \(DeviceMesh, dim"),
    (lambda: C.all_reduce_([torch.ones(2, dtype=torch.int64)], op="avg", group=None),
     r"op='avg' needs floating-point tensors"),
])
def test_bad_arguments_fail_with_one_clear_sentence(call, message):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        call()
