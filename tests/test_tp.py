"""pp.tp: the rewritten program equals the original on every rank, with the fewest collectives.

Each world size is spawned once (a module-scoped fixture runs every case and returns what it saw);
the tests then check one property each. Errors of the entry point are checked in-process.
"""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel.style import RowwiseParallel as TorchRow

import pp.tp as tp
from pp.testing import run_ranks
from pp.tp.stage import shard_stage_module

AR, AG, RS, WAIT = "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "wait_tensor"


class LinearBN(nn.Module):
    """A column-parallel output consumed by an op no plan covers (batch norm)."""

    def __init__(self, out: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(3, out)
        self.bn = nn.BatchNorm1d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class MLPList(nn.Module):
    """Blocks of Linear -> ReLU -> Linear in an nn.ModuleList: col/row pairs."""

    def __init__(self, blocks: int = 2, d: int = 6, hidden: int = 12, bias: bool = True) -> None:
        super().__init__()
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, d, bias=bias))
            for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.mlp:
            x = block(x)
        return x


class GatedBlock(nn.Module):
    """SwiGLU-like block on 3-D input with a residual and a norm, then a gathered head."""

    def __init__(self, d: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden), nn.Linear(d, hidden, bias=False)
        self.w2, self.ln, self.head = nn.Linear(hidden, d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.w1(x)) * self.w3(x)
        return self.head(self.ln(self.w2(h) + x))


class Attention(nn.Module):
    """GPT attention: fused qkv split in three, (b, t, heads, head_dim) views, SDPA, out-projection."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, c))


def _pairs(blocks: int, torch_style: bool) -> dict:
    if torch_style:
        from torch.distributed.tensor.parallel.style import ColwiseParallel, RowwiseParallel
    else:
        ColwiseParallel, RowwiseParallel = tp.ColwiseParallel, tp.RowwiseParallel
    plan = {}
    for i in range(blocks):
        plan[f"mlp.{i}.0"], plan[f"mlp.{i}.2"] = ColwiseParallel(), RowwiseParallel()
    return plan


def _collectives(ep: torch.export.ExportedProgram) -> dict:
    ops = Counter(n.target.__name__.split(".")[0] for n in ep.graph.nodes
                  if n.op == "call_function" and "_c10d_functional" in str(n.target))
    return dict(ops)


def _transform(model: nn.Module, x: torch.Tensor, rank: int, ws: int, plan: dict, decompose: bool,
               dynamic: bool = False, device: str = "cpu"):
    dyn = ({0: torch.export.Dim("batch", min=2)},) if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=dyn)
    if decompose:
        ep = ep.run_decompositions()
    return tp.tensor_parallel_transformation(ep, rank, ws, device, plan)


def _run_cases(rank: int, ws: int, cases: tuple, irs: tuple, device: str = "cpu") -> dict:
    """The named program cases on this rank: {(case, ir): (collective counts, max |error|, shapes)}.

    Programs are exported on the CPU and transformed for `device` ("cuda" with NCCL ranks:
    `run_ranks(_run_cases, 2, cases, irs, "cuda", backend="nccl")`)."""
    warnings.simplefilter("ignore")
    seen = {}
    for ir in irs:
        decompose = ir == "decomposed"
        for case in cases:
            torch.manual_seed(0)
            if case == "attn" and decompose:
                continue  # the decomposed IR spells SDPA out through (batch * heads) views: gathers
            if case == "attn":
                model, x = Attention(), torch.randn(2, 8, 16)
                plan = {"qkv": tp.ColwiseParallel(), "proj": tp.RowwiseParallel()}
                out = _transform(model, x, rank, ws, plan, decompose, dynamic=True, device=device)
                x = torch.randn(3, 8, 16)
            elif case == "uncovered":
                model, x = LinearBN(12), torch.randn(6, 3)
                out = _transform(model, x, rank, ws, {"fc": tp.ColwiseParallel()}, decompose, device=device)
            elif case in ("mlp", "mlp_nobias"):
                blocks, bias = (2, True) if case == "mlp" else (1, False)
                model, x = MLPList(blocks, bias=bias), torch.randn(5, 6)
                out = _transform(model, x, rank, ws, _pairs(blocks, torch_style=not bias), decompose,
                                 device=device)
            else:  # "gated": 3-D input, dynamic batch, SwiGLU, residual, gathered head
                model, x = GatedBlock(), torch.randn(2, 4, 6)
                # "gated_sp": w2 reduce-scatters along the sequence (torch style), the rest gathers it
                w2 = TorchRow(output_layouts=Shard(1)) if case == "gated_sp" else tp.RowwiseParallel()
                plan = {"w1": tp.ColwiseParallel(), "w3": tp.ColwiseParallel(),
                        "w2": w2, "head": tp.ColwiseParallel(gather_output=True)}
                out = _transform(model, x, rank, ws, plan, decompose, dynamic=True, device=device)
                x = torch.randn(3, 4, 6)  # another batch size than traced
            with torch.no_grad():
                want = model(x)
                err = (out.module()(x.to(device)).cpu() - want).abs().max().item()
            seen[(case, ir)] = (_collectives(out), err, _shapes(out))
    if ws == 2:
        _stage_grads(rank, ws, device)
    return seen


def _shapes(ep: torch.export.ExportedProgram) -> dict:
    return {k: tuple(v.shape) for k, v in ep.state_dict.items()}


IRS = ("training", "decomposed")
ABC = ("uncovered", "mlp", "mlp_nobias")
# world size -> (cases, IRs) run there; every world size spawns its ranks once for all the tests.
RUNS = {2: (ABC + ("gated", "gated_sp", "attn"), IRS), 3: (("mlp", "mlp_nobias"), ("training",)), 4: (ABC, ("training",))}


@pytest.fixture(scope="module", params=sorted(RUNS))
def ranks_seen(request) -> tuple[int, list[dict]]:
    ws = request.param
    return ws, run_ranks(_run_cases, ws, *RUNS[ws], timeout_s=150)


def _each(ranks_seen, case: str):
    """(ir, counts, shapes) of `case` on every rank and IR this world size ran it."""
    ws, seen = ranks_seen
    if case not in RUNS[ws][0]:
        pytest.skip(f"{case} is not run on {ws} ranks")
    for cases in seen:
        for (name, ir), (counts, _, shapes) in cases.items():
            if name == case:
                yield ir, counts, shapes


def test_outputs_equal_unsharded_model_on_every_rank(ranks_seen):
    _, seen = ranks_seen
    for rank, cases in enumerate(seen):
        for case, (_, err, _) in cases.items():
            assert err < 1e-5, f"rank {rank} case {case}: max error {err}"


def test_uncovered_op_gets_exactly_one_all_gather(ranks_seen):
    ws = ranks_seen[0]
    for ir, counts, shapes in _each(ranks_seen, "uncovered"):
        assert counts == {AG: 1, WAIT: 1}, (ir, counts)
        assert shapes["fc.weight"] == (12 // ws, 3) and shapes["fc.bias"] == (12 // ws,)
        assert shapes["bn.weight"] == (12,)


def test_two_col_row_pairs_get_exactly_two_all_reduces(ranks_seen):
    ws = ranks_seen[0]
    for ir, counts, shapes in _each(ranks_seen, "mlp"):
        assert counts == {AR: 2, WAIT: 2}, (ir, counts)
        assert shapes["mlp.0.0.weight"] == (12 // ws, 6) and shapes["mlp.0.0.bias"] == (12 // ws,)
        assert shapes["mlp.1.2.weight"] == (6, 12 // ws) and shapes["mlp.1.2.bias"] == (6,)


def test_no_bias_pair_with_torch_styles_gets_one_all_reduce(ranks_seen):
    ws = ranks_seen[0]
    for ir, counts, shapes in _each(ranks_seen, "mlp_nobias"):
        assert counts == {AR: 1, WAIT: 1}, (ir, counts)
        assert shapes == {"mlp.0.0.weight": (12 // ws, 6), "mlp.0.2.weight": (6, 12 // ws)}


def test_gated_block_keeps_elementwise_ops_sharded_with_dynamic_batch(ranks_seen):
    for ir, counts, _ in _each(ranks_seen, "gated"):
        # one all-reduce after w2 and one gather for the gathered head; silu(w1 x) * w3 x stays sharded
        assert counts == {AR: 1, AG: 1, WAIT: 2}, (ir, counts)


def test_fused_qkv_attention_runs_on_local_heads_with_one_all_reduce(ranks_seen):
    ws = ranks_seen[0]
    for ir, counts, shapes in _each(ranks_seen, "attn"):
        # qkv is sharded in 3 blocks (q, k, v alike): split, head views, SDPA and the merge stay local
        assert counts == {AR: 1, WAIT: 1}, (ir, counts)
        assert shapes["qkv.weight"] == (48 // ws, 16) and shapes["proj.weight"] == (16, 16 // ws)


def test_fused_blocks_are_cut_and_gathered_block_by_block():
    from pp.tp.layout import ParamShard, take_shard

    full = torch.arange(12.0).view(12, 1)
    parts = [take_shard(full, ParamShard(0, blocks=3), r, 2) for r in range(2)]
    assert parts[0].flatten().tolist() == [0, 1, 4, 5, 8, 9] and parts[1].flatten().tolist() == [2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError, match=r"size 12 of dim 0 .* does not split into 3 blocks x 8"):
        take_shard(full, ParamShard(0, blocks=3), 0, 8)


def test_row_output_scattered_along_sequence_uses_one_reduce_scatter(ranks_seen):
    for ir, counts, _ in _each(ranks_seen, "gated_sp"):
        assert counts[RS] == 1 and AR not in counts, (ir, counts)


# ------------------------------------------------------------------------------ entry-point errors

def _export(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,))


def test_fused_blocks_that_do_not_split_evenly_raise_value_error_naming_module_and_sizes():
    # an uneven size is sharded as torch.chunk cuts it (tests/test_tp_seed.py); the q, k and v
    # blocks of a fused projection must be cut alike, so 16 features per block over 3 ranks cannot
    ep = _export(Attention(), torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match=r"qkv: ColwiseParallel splits out_features=48 .* in 3 fused blocks "
                                         r".* world_size=3, which must divide each block of 16"):
        tp.tensor_parallel_transformation(ep, 0, 3, "cpu", {"qkv": tp.ColwiseParallel(), "proj": tp.RowwiseParallel()})


@pytest.mark.parametrize("plan, message", [
    ({"nope": tp.ColwiseParallel()}, r"\['nope'\] that have no 'weight'"),
    ({"bn": tp.ColwiseParallel()}, r"bn: weight has shape \(8,\)"),
    ({"fc": "colwise"}, r"fc: style must be"),
])
def test_bad_plans_fail_with_one_clear_sentence(plan, message):
    ep = _export(LinearBN(8), torch.randn(4, 3))
    with pytest.raises((ValueError, TypeError), match=message):
        tp.tensor_parallel_transformation(ep, 0, 2, "cpu", plan)


def test_bad_rank_raises():
    ep = _export(LinearBN(8), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        tp.tensor_parallel_transformation(ep, 2, 2, "cpu", {"fc": tp.ColwiseParallel()})


# ---------------------------------------------- trainable stage modules (run inside the 2-rank run)

def _stage_grads(rank: int, ws: int, device: str = "cpu") -> None:
    """shard_stage_module on a plain module and on the splitter's stages: outputs and grads match."""
    import pp

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 6), MLPList(2)), torch.randn(2, 5, 4)
    ref_out = model(x)
    ref_out.square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plan = {f"1.{k}": v for k, v in _pairs(2, torch_style=False).items()}

    whole = shard_stage_module(model, (x,), rank, ws, device, plan)
    pipe = pp.pipeline(model, (x,), split_spec={"1.mlp.1": pp.SplitPoint.BEGINNING})
    s0, s1 = pipe.get_stage_module(0), pipe.get_stage_module(1)
    h = s0(x)[0].detach()
    s0, s1 = (shard_stage_module(s, args, rank, ws, device, plan) for s, args in ((s0, (x,)), (s1, (h,))))
    x = x.to(device)
    for outputs, modules in ((whole(x), [whole]), (s1(s0(x)[0])[0], [s0, s1])):
        torch.testing.assert_close(outputs.cpu(), ref_out)
        outputs.square().sum().backward()
        for mod in modules:
            for name, p in mod.named_parameters():
                fqn, _, leaf = name.rpartition(".")
                expected = ref[name]
                if fqn in plan and isinstance(plan[fqn], tp.ColwiseParallel):
                    expected = expected.chunk(ws, 0)[rank]
                elif fqn in plan and leaf == "weight":
                    expected = expected.chunk(ws, 1)[rank]
                assert p.shape == expected.shape, name
                torch.testing.assert_close(p.grad.cpu(), expected, msg=name)
                p.grad = None


def test_shard_stage_module_matches_outputs_and_gradients(ranks_seen):
    """Checked on the ranks of the 2-rank run (`_run_cases` calls `_stage_grads`, which asserts)."""
    if ranks_seen[0] != 2:
        pytest.skip("run with 2 ranks")
