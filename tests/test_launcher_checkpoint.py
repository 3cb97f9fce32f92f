"""Checkpoints: atomic DCP saves under original names, damage detection, loading at another pp degree."""
from __future__ import annotations

import os

import pytest
import torch

from pp.checkpoint_api import load_unsplit
from pp.launcher import checkpoint as ckpt
from pp.launcher.models import GPT
from pp.testing import run_ranks


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=256, d_model=16, n_layers=4, n_heads=2, seq_len=8, tie_weights=True)


def _state(model: torch.nn.Module) -> dict:
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": ckpt.optimizer_state(model.named_parameters(), opt)}


def test_save_load_round_trip_and_load_unsplit(tmp_path):
    root = str(tmp_path / "checkpoints")
    src = _model(0)
    state = _state(src)
    path = ckpt.save(root, 7, state, {"pp": 1})
    assert path.endswith("step-7") and sorted(os.listdir(root)) == ["step-7"]
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 7 and all("sha256" in r for r in manifest["files"].values())
    dst = _model(1)
    assert load_unsplit(dst, str(tmp_path)) == path  # an output dir resolves to its newest checkpoint
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = _state(_model(2))
    ckpt.load(path, fresh)
    torch.testing.assert_close(fresh["optim"]["blocks.0.attn.qkv.weight"], state["optim"]["blocks.0.attn.qkv.weight"])
    with pytest.raises(ckpt.CheckpointError, match="has no entry 'model.blocks.4"):
        load_unsplit(GPT(vocab_size=256, d_model=16, n_layers=5, n_heads=2, seq_len=8), path)
    with pytest.raises(ckpt.CheckpointError, match="has shape"):
        load_unsplit(GPT(vocab_size=256, d_model=8, n_layers=4, n_heads=2, seq_len=8), path)
    fewer = GPT(vocab_size=256, d_model=16, n_layers=3, n_heads=2, seq_len=8, tie_weights=True)
    with pytest.raises(ckpt.CheckpointError, match=r"holds 12 model tensor\(s\) this model does not have "
                                                   r"\('blocks\.3\.attn\.proj\.bias', .*saved from a different model"):
        load_unsplit(fewer, path)   # a checkpoint of 4 blocks into a model of 3: refused, as load_state_dict does
    load_unsplit(fewer, path, strict=False)
    torch.testing.assert_close(fewer.blocks[2].mlp.fc.weight, src.blocks[2].mlp.fc.weight, rtol=0, atol=0)
    more = GPT(vocab_size=256, d_model=16, n_layers=5, n_heads=2, seq_len=8, tie_weights=True)
    load_unsplit(more, path, strict=False)   # as load_state_dict(strict=False): block 4 keeps its weights
    torch.testing.assert_close(more.blocks[3].mlp.fc.weight, src.blocks[3].mlp.fc.weight, rtol=0, atol=0)
    untied = GPT(vocab_size=256, d_model=16, n_layers=4, n_heads=2, seq_len=8)
    untied_path = ckpt.save(str(tmp_path / "untied"), 1, {"model": untied.state_dict()}, {"pp": 1})
    tied = _model(3)
    before = tied.lm_head.weight.detach().clone()
    with pytest.raises(ckpt.CheckpointError, match=r"holds different tensors under 'tok_emb\.weight' and "
                                                   r"'lm_head\.weight', which this model ties"):
        load_unsplit(tied, untied_path)    # one of the two would silently win
    assert torch.equal(tied.lm_head.weight, before), "a refused load changed the model"
    with torch.device("meta"):
        ghost = GPT(vocab_size=256, d_model=16, n_layers=4, n_heads=2, seq_len=8)
    with pytest.raises(ValueError, match="on the meta device .* call model.to_empty"):
        load_unsplit(ghost, path)   # once a DCP traceback about a missing process group


def test_resuming_into_another_model_config_is_refused_by_name():
    """Changes no tensor shape shows (n_heads, tie_weights) are found in the manifest's model section."""
    saved = {"name": "gpt", "d_model": 32, "n_heads": 4, "tie_weights": False, "init_from": None, "args": {}}
    ckpt.check_same_model("ck", saved, dict(saved, init_from="elsewhere"))   # init_from does not count
    ckpt.check_same_model("ck", None, saved)                                 # an older manifest: nothing to compare
    ckpt.check_same_model("ck", dict(saved, d_ff=0), dict(saved, d_ff=128))  # 0 means 4 * d_model: the same model
    with pytest.raises(ckpt.CheckpointError, match=r"^checkpoint ck was saved for another model \(model\.n_heads=4 "
                                                   r"there, 8 here; model\.tie_weights=False there, True here\)"):
        ckpt.check_same_model("ck", saved, dict(saved, n_heads=8, tie_weights=True))
    hf = {"name": "hf:LlamaForCausalLM", "seq_len": 128, "config": {"hidden_size": 64, "rope": [1, 2]}}
    ckpt.check_same_model("ck", hf, dict(hf, seq_len=256, config={"hidden_size": 64, "rope": (1, 2)}))
    # another architecture: the config keys that differ, not both whole configs (once a 2,000-character line)
    qwen = dict(hf, name="hf:Qwen2ForCausalLM", config={**{f"k{i}": i for i in range(40)}, "model_type": "qwen2",
                                                        "hidden_size": 64, "use_sliding_window": False})
    llama = dict(hf, config={**{f"k{i}": i for i in range(40)}, "model_type": "llama", "hidden_size": 64})
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_same_model("ck", qwen, llama)
    assert str(e.value) == ("checkpoint ck was saved for another model (model.name='hf:Qwen2ForCausalLM' there, "
                            "'hf:LlamaForCausalLM' here; model.config.model_type='qwen2' there, 'llama' here; "
                            "model.config.use_sliding_window=False there, None here): resume it with "
                            "the model it was saved for")


def test_partial_and_damaged_checkpoints_are_skipped_and_named(tmp_path):
    root = str(tmp_path)
    state = _state(_model())
    for step in (2, 4, 6):
        ckpt.save(root, step, state, {}, keep=2)
    assert ckpt.list_steps(root) == [6, 4]  # keep=2 pruned step-2
    os.makedirs(os.path.join(root, ".tmp-step-8"))  # a save killed before its rename
    data = next(n for n in os.listdir(ckpt.step_dir(root, 6)) if n.endswith(".distcp"))
    with open(os.path.join(ckpt.step_dir(root, 6), data), "r+b") as f:
        f.seek(64)
        f.write(b"\0garbage\0")
    logged = []
    assert ckpt.find_latest(root, log=logged.append) == ckpt.step_dir(root, 4)
    assert logged == [f"checkpoint {ckpt.step_dir(root, 6)} is damaged (file {data} does not match its sha256 checksum); skipping it"]
    os.remove(os.path.join(ckpt.step_dir(root, 4), ckpt.MANIFEST))
    assert ckpt.find_latest(root, log=logged.append) is None and "has no manifest.json" in logged[-1]
    assert ckpt.remove_partial_saves(root) == [".tmp-step-8"]
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        load_unsplit(_model(), ckpt.step_dir(root, 6))
    # keep counts complete checkpoints only: step-4 (no manifest now) and a stray step-12 never push out
    # a good one (it once kept a damaged step-12 and deleted the last good step)
    os.makedirs(ckpt.step_dir(root, 12))
    ckpt.save(root, 8, state, {}, keep=2)
    ckpt.save(root, 10, state, {}, keep=2)
    assert ckpt.list_steps(root) == [12, 10, 8, 4]   # step-6 pruned: 10 and 8 are the two complete ones


def test_a_copied_or_hand_edited_checkpoint_counts_as_damaged_and_resolve_names_what_it_skipped(tmp_path):
    # field report: step-10 copied as step-30 was taken as the newest; resume then set aside every step
    # above the manifest's 10, the good ones too, and crashed. A manifest whose files list left out a
    # truncated shard passed the check and failed inside DCP's load with a traceback.
    import json
    import shutil

    root = str(tmp_path)
    state = _state(_model())
    for step in (2, 4):
        ckpt.save(root, step, state, {})
    shutil.copytree(ckpt.step_dir(root, 2), ckpt.step_dir(root, 9))
    logged: list[str] = []
    assert ckpt.find_latest(root, log=logged.append) == ckpt.step_dir(root, 4)
    assert logged == [f"checkpoint {ckpt.step_dir(root, 9)} is damaged (its manifest.json is of step 2, not 9 "
                      f"(a copied or renamed checkpoint)); skipping it"]

    def edit(which: int, **changes) -> None:
        mpath = os.path.join(ckpt.step_dir(root, which), ckpt.MANIFEST)
        manifest = {**json.load(open(mpath)), **changes}
        json.dump({k: v for k, v in manifest.items() if v is not None}, open(mpath, "w"))

    edit(9, step=None)
    assert "gives no step (got None)" in ckpt.problem(ckpt.step_dir(root, 9))
    edit(9, step=9, files=["x"])
    assert "lists its files in an unknown form" in ckpt.problem(ckpt.step_dir(root, 9))
    data = next(n for n in os.listdir(ckpt.step_dir(root, 9)) if n.endswith(".distcp"))
    edit(9, files={".metadata": json.load(open(os.path.join(ckpt.step_dir(root, 2), ckpt.MANIFEST)))["files"][".metadata"]})
    assert ckpt.problem(ckpt.step_dir(root, 9)) == f"file {data}, which its DCP metadata names, is not in its manifest.json"
    skipped: list[str] = []
    assert ckpt.resolve(root, skipped.append) == ckpt.step_dir(root, 4)
    assert len(skipped) == 1 and skipped[0].startswith(f"checkpoint {ckpt.step_dir(root, 9)} is damaged (file {data}")
    with pytest.warns(UserWarning, match=f"step-9 is damaged \\(file {data}") as caught:
        assert load_unsplit(_model(), root) == ckpt.step_dir(root, 4)
    assert caught[0].filename == __file__   # the caller's line


def _owner(name: str, world: int, n_layers: int = 4) -> set[int]:
    """Ranks holding parameter `name` when the 4-block GPT is cut into `world` stages (the tied one on two)."""
    if name.startswith("blocks."):
        return {int(name.split(".")[1]) * world // n_layers}
    if name.startswith(("tok_emb", "lm_head")):
        return {0, world - 1}
    return {0} if name.startswith("pos_emb") else {world - 1}


def _stage_state(rank: int, world: int) -> tuple[dict, dict, dict]:
    """(model params of this rank, AdamW state of them, the whole model's state) for a model cut by hand."""
    model = _model(0)
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if rank in _owner(n, world)]
    opt = torch.optim.AdamW([p for _, p in named])
    return {n: p.detach() for n, p in named}, ckpt.optimizer_state(named, opt), model.state_dict()


def _save_as_stages(rank: int, world: int, root: str) -> list[str]:
    model_state, optim_state, _ = _stage_state(rank, world)
    ckpt.save(root, 2, {"model": model_state, "optim": optim_state}, {"pp": world})
    ckpt.save(root, 4, {"model": model_state, "optim": optim_state}, {"pp": world})
    return sorted(model_state)


def _load_as_stages(rank: int, world: int, root: str) -> tuple:
    model_state, _, expected = _stage_state(rank, world)
    for t in model_state.values():
        t.zero_()
    logs: list[str] = []
    path = ckpt.find_latest(root, log=logs.append)
    ckpt.load(path, {"model": model_state})
    for name, t in model_state.items():
        assert torch.equal(t, expected[name]), name
    return path, logs


def _load_other_model(rank: int, world: int, root: str, n_layers: int) -> str:
    """This rank's part of a GPT of `n_layers` blocks cut into `world` stages, loaded from the 4-block
    checkpoint: the error every rank raises (the same on each), or 'loaded'."""
    torch.manual_seed(0)
    model = GPT(vocab_size=256, d_model=16, n_layers=n_layers, n_heads=2, seq_len=8, tie_weights=True)
    mine = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)
            if rank in _owner(n, world, n_layers)}
    try:
        ckpt.load(ckpt.step_dir(root, 2), {"model": mine})
    except ckpt.CheckpointError as e:
        return str(e)
    return "loaded"


def test_checkpoint_saved_at_pp2_loads_at_pp4_and_unsplit(tmp_path):
    root = str(tmp_path / "ck")
    names = run_ranks(_save_as_stages, 2, root, timeout_s=120)
    assert set(names[0]) & set(names[1]) == {"tok_emb.weight", "lm_head.weight"}  # the tied weight, on both
    manifest = ckpt.read_manifest(ckpt.step_dir(root, 4))
    assert manifest["world_size"] == 2 and manifest["pp"] == 2
    # damage the newest: every rank skips it, rank 0 names it
    with open(os.path.join(ckpt.step_dir(root, 4), "__1_0.distcp"), "ab") as f:
        f.write(b"tail")
    results = run_ranks(_load_as_stages, 4, root, timeout_s=120)
    assert all(path == ckpt.step_dir(root, 2) for path, _ in results)
    assert "step-4 is damaged" in results[0][1][0] and results[1][1] == []
    ref, got = _model(0), _model(5)
    load_unsplit(got, ckpt.step_dir(root, 2))
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(got(x), ref(x), rtol=0, atol=0)
    # Another model: every rank raises the same error, before any tensor is read. With 6 blocks only the
    # last stage misses some (rank 1's error was once rank 1's alone, and rank 0 printed a lost peer); with
    # 2 blocks no rank misses anything, but the checkpoint holds blocks no rank has (they were dropped).
    more = run_ranks(_load_other_model, 2, root, 6, timeout_s=120)
    assert more[0] == more[1] and "has no entry 'model.blocks.4" in more[0], more
    fewer = run_ranks(_load_other_model, 2, root, 2, timeout_s=120)
    assert fewer[0] == fewer[1] and "holds 24 model tensor(s) this model does not have ('blocks.2" in fewer[0], fewer


class _NormFirst(torch.nn.Module):
    """state_dict order: norm, emb, head; `tie` shares the head with the embedding."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.emb.weight


def _save_untied_halves(rank: int, world: int, root: str) -> None:
    torch.manual_seed(0)
    state = _NormFirst().state_dict()
    mine = {n: t for n, t in state.items() if (n == "emb.weight") == (rank == 0)}   # rank 1: norm and head
    ckpt.save(root, 1, {"model": mine}, {"pp": world})


def test_strict_false_into_tied_names_takes_the_last_listed_whatever_file_holds_it(tmp_path):
    """Found in the field: of an untied checkpoint's two tensors under names the model ties, the one read
    last won, and DCP reads file by file (here rank 1's, holding `norm` and `head`, first): the winner
    followed the pp layout that saved it, not `state_dict()`'s order as documented and as in
    `load_state_dict(strict=False)`."""
    root = str(tmp_path / "ck")
    run_ranks(_save_untied_halves, 2, root, timeout_s=120)
    torch.manual_seed(0)
    untied = _NormFirst()
    tied = _NormFirst(tie=True)
    load_unsplit(tied, ckpt.step_dir(root, 1), strict=False)
    want = _NormFirst(tie=True)
    want.load_state_dict(untied.state_dict(), strict=False)
    assert torch.equal(want.head.weight, untied.head.weight)
    assert torch.equal(tied.head.weight, untied.head.weight) and tied.head.weight is tied.emb.weight
    assert torch.equal(tied.norm.weight, untied.norm.weight)
