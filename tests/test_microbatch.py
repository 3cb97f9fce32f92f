"""pp.microbatch: split/merge round trips, specs, replication, and the error messages."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from pp.microbatch import TensorChunkSpec, _Replicate, merge_chunks, split_args_kwargs_into_chunks


def _batch(n: int = 8) -> tuple:
    x = torch.arange(n * 3.0).reshape(n, 3)
    return (x, [x + 1, {"ids": torch.arange(n), "scale": 2.5}], ("tag", None))


def test_split_then_merge_round_trips_nested_args() -> None:
    args = _batch()
    args_split, kwargs_split = split_args_kwargs_into_chunks(args, None, 4)
    assert len(args_split) == 4 and kwargs_split == [{}] * 4
    assert args_split[1][0].shape == (2, 3)
    assert args_split[1][1][1]["scale"] == 2.5 and args_split[3][2] == ("tag", None)
    merged = merge_chunks(args_split, None)
    assert_close(merged[:2], args[:2])
    assert merged[2] == ("tag", None)


def test_split_returns_views_not_copies() -> None:
    x = torch.zeros(6, 2)
    (first,), = split_args_kwargs_into_chunks((x,), None, 3)[0][:1]
    assert first.data_ptr() == x.data_ptr()


def test_kwargs_are_split_alongside_args() -> None:
    x, mask = torch.randn(6, 4), torch.ones(6, 4, dtype=torch.bool)
    args_split, kwargs_split = split_args_kwargs_into_chunks((x,), {"mask": mask, "causal": True}, 3)
    assert [a[0].shape[0] for a in args_split] == [2, 2, 2]
    assert all(k["causal"] is True and k["mask"].shape == (2, 4) for k in kwargs_split)
    assert_close(merge_chunks(kwargs_split, None), {"mask": mask, "causal": True})


def test_custom_split_dim_from_specs() -> None:
    x, y = torch.randn(3, 8), torch.randn(8, 2)
    spec = TensorChunkSpec.from_tuple((1, 0))
    args_split, kwargs_split = split_args_kwargs_into_chunks(
        (x,), {"y": y, "z": torch.randn(5, 8)}, 4, spec[:1], {"z": TensorChunkSpec(-1)})
    assert args_split[0][0].shape == (3, 2) and kwargs_split[0]["y"].shape == (2, 2)
    assert kwargs_split[0]["z"].shape == (5, 2)
    assert_close(merge_chunks([a[0] for a in args_split], TensorChunkSpec(1)), x)


def test_spec_prefix_covers_a_subtree_and_replicate_keeps_tensors_whole() -> None:
    x, w = torch.randn(4, 6), torch.randn(3)
    args_split, _ = split_args_kwargs_into_chunks(((x, x),), {"w": w}, 2, (TensorChunkSpec(1),), {"w": _Replicate})
    assert args_split[0][0][0].shape == (4, 3) and args_split[1][0][1].shape == (4, 3)
    _, kwargs_split = split_args_kwargs_into_chunks((x,), {"w": w}, 2, None, {"w": _Replicate()})
    assert all(k["w"] is w for k in kwargs_split)


def test_non_tensors_are_replicated_and_merge_takes_the_first() -> None:
    obj = object()
    args_split, _ = split_args_kwargs_into_chunks((torch.ones(2), obj, 3), None, 2)
    assert [a[1] for a in args_split] == [obj, obj] and [a[2] for a in args_split] == [3, 3]
    assert merge_chunks([("a", torch.ones(1)), ("b", torch.zeros(1))], None)[0] == "a"


def test_no_tensors_at_all_gives_replicated_chunks() -> None:
    args_split, kwargs_split = split_args_kwargs_into_chunks((1, "a"), {"k": None}, 3)
    assert args_split == [(1, "a")] * 3 and kwargs_split == [{"k": None}] * 3


def test_too_small_batch_error_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"batch of 3 along dim 0 cannot be split into 4 microbatches"):
        split_args_kwargs_into_chunks((torch.ones(3, 2),), None, 4)


def test_uneven_split_follows_tensor_split() -> None:
    x = torch.arange(10)
    args_split, _ = split_args_kwargs_into_chunks((x,), None, 4)
    assert [a[0].numel() for a in args_split] == [3, 3, 2, 2]
    assert_close(merge_chunks([a[0] for a in args_split], TensorChunkSpec(0)), x)


@pytest.mark.parametrize("chunks", [0, -1, 1.5])
def test_chunks_must_be_a_positive_int(chunks) -> None:
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        split_args_kwargs_into_chunks((torch.ones(4),), None, chunks)


def test_each_tensor_is_split_on_its_own_size() -> None:
    # As torch.distributed.pipelining: x of 16 rows and t of 4 rows in 4 chunks give 4 and 1 rows.
    x, t = torch.arange(16.0).view(16, 1), torch.arange(4.0)
    args_split, kwargs_split = split_args_kwargs_into_chunks((x,), {"extra": t}, 4)
    assert [a[0].shape[0] for a in args_split] == [4] * 4
    assert [k["extra"].tolist() for k in kwargs_split] == [[0.0], [1.0], [2.0], [3.0]]
    with pytest.raises(ValueError, match=r"batch of 3 along dim 0 cannot be split into 4 .*kwargs\['m'\]"):
        split_args_kwargs_into_chunks((x,), {"m": torch.ones(3)}, 4)


def test_bad_specs_are_rejected_with_their_names() -> None:
    with pytest.raises(ValueError, match="args_chunk_spec .* does not match args: at args the spec is a tuple of "
                                         "1 and args is a tuple of 2; give one spec per entry") as err:
        split_args_kwargs_into_chunks((torch.ones(4), torch.ones(4)), None, 2, (TensorChunkSpec(0),))
    assert "\n" not in str(err.value) and "TreeSpec" not in str(err.value)
    with pytest.raises(ValueError, match=r"does not match kwargs: at kwargs\['mask'\] the spec is a tuple of 1 "
                                         r"and kwargs\['mask'\] is a tensor;"):
        split_args_kwargs_into_chunks((torch.ones(4),), {"mask": torch.ones(4)}, 2, None,
                                      {"mask": (TensorChunkSpec(0),)})
    with pytest.raises(ValueError, match=r"kwargs_chunk_spec names \['nope'\]"):
        split_args_kwargs_into_chunks((torch.ones(4),), {}, 2, None, {"nope": TensorChunkSpec(0)})
    with pytest.raises(ValueError, match=r"args\[0\] has shape \(4,\), which has no dim 1"):
        split_args_kwargs_into_chunks((torch.ones(4),), None, 2, (TensorChunkSpec(1),))


def test_merge_spec_naming_a_dim_the_output_lacks_is_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"output_merge_spec merges output\[0\] along dim 7, but it has 2 "
                                         r"dimensions \(shape \(2, 3\)\)"):
        merge_chunks([(torch.ones(2, 3),), (torch.ones(2, 3),)], (TensorChunkSpec(7),), spec_name="output_merge_spec")
    with pytest.raises(ValueError, match="chunk_spec .* does not match the output: at the output the spec is a "
                                         "tuple of 2 and the output is a tuple of 1"):
        merge_chunks([(torch.ones(2, 3),)], (TensorChunkSpec(0), TensorChunkSpec(1)))


def test_merge_rejects_mismatched_chunks_and_scalars() -> None:
    with pytest.raises(ValueError, match="chunk 1 has structure"):
        merge_chunks([(torch.ones(1),), (torch.ones(1), torch.ones(1))], None)
    with pytest.raises(ValueError, match=r"output\['loss'\] is a 0-dim tensor in chunk 0 but not in every"):
        merge_chunks([{"loss": torch.tensor(1.0)}, {"loss": torch.ones(1)}], None)
    with pytest.raises(ValueError, match="non-empty"):
        merge_chunks([], None)


def test_merge_averages_float_scalars_and_stacks_integer_ones() -> None:
    chunks = [{"loss": torch.tensor(1.0), "n": torch.tensor(3), "logits": torch.ones(2, 3)},
              {"loss": torch.tensor(2.0), "n": torch.tensor(4), "logits": torch.zeros(1, 3)}]
    merged = merge_chunks(chunks, None)
    # weighted by each chunk's rows (2 and 1, from the logits): the batch's mean of a mean over rows, as
    # step() weights gradients (a plain mean, 1.5, disagreed with the unsplit model's eval loss)
    assert_close(merged["loss"], torch.tensor((1.0 * 2 + 2.0 * 1) / 3))
    assert merged["n"].tolist() == [3, 4]
    assert merged["logits"].shape == (3, 3)
    even = merge_chunks([{"loss": torch.tensor(1.0), "logits": torch.ones(2, 3)},
                         {"loss": torch.tensor(2.0), "logits": torch.ones(2, 3)}], None)
    assert_close(even["loss"], torch.tensor(1.5))


def test_tensor_chunk_spec_repr_and_equality() -> None:
    assert TensorChunkSpec(1) == TensorChunkSpec(1) != TensorChunkSpec(0)
    assert repr(TensorChunkSpec(1)) == "pp.microbatch.TensorChunkSpec(1)"
    assert str(TensorChunkSpec(1)) == "TensorChunkSpec(1)"
    assert TensorChunkSpec.from_dict({"a": 2}) == {"a": TensorChunkSpec(2)}


def _block_mask_case(rows: int = 5, seq: int = 256):
    """A document-causal flex-attention mask that differs per row (found in the field: every
    microbatch got the whole batch's mask, and the outputs were silently wrong)."""
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(0)
    doc = torch.arange(rows * seq).reshape(rows, seq) // torch.arange(20, 20 + rows).unsqueeze(1)

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(same_doc_causal, B=rows, H=1, Q_LEN=seq, KV_LEN=seq, device="cpu")
    q, k, v = (torch.randn(rows, 1, seq, 16) for _ in range(3))
    return q, k, v, mask


def test_a_block_mask_is_split_with_the_batch():
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    warnings.filterwarnings("ignore")
    q, k, v, mask = _block_mask_case()
    want = flex_attention(q, k, v, block_mask=mask)
    chunks, kw_chunks = split_args_kwargs_into_chunks((q, k, v), {"block_mask": mask}, 2)   # 3 + 2 rows
    got = torch.cat([flex_attention(*a, block_mask=kw["block_mask"]) for a, kw in zip(chunks, kw_chunks)])
    assert [kw["block_mask"].kv_num_blocks.shape[0] for kw in kw_chunks] == [3, 2]
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"batch of 5 cannot be split into 6 microbatches \(kwargs\['block_mask'\]"):
        split_args_kwargs_into_chunks((), {"block_mask": mask}, 6)


def test_sum_reducer_merges_as_torchs_and_cannot_split():
    """torch's `sum_reducer` (a `_CustomReducer`) as a merge spec leaf: the microbatches' values added."""
    from torch.distributed.pipelining import microbatch as tmb

    from pp.microbatch import _CustomReducer, sum_reducer

    chunks = [{"loss": torch.tensor(float(i + 1)), "x": torch.randn(2 - i % 2, 3)} for i in range(3)]
    got = merge_chunks(chunks, {"loss": sum_reducer, "x": None})
    want = tmb.merge_chunks(chunks, {"loss": tmb.sum_reducer, "x": tmb.TensorChunkSpec(0)})
    torch.testing.assert_close(got["loss"], torch.tensor(6.0))
    torch.testing.assert_close(got["loss"], want["loss"])
    torch.testing.assert_close(got["x"], want["x"])
    longest = _CustomReducer(0, lambda acc, v: max(acc, v.shape[0]))
    assert merge_chunks(chunks, {"loss": None, "x": longest})["x"] == 2
    with pytest.raises(TypeError, match=r"args\[0\]: a _CustomReducer \(such as sum_reducer\) merges outputs"):
        split_args_kwargs_into_chunks((torch.ones(4),), {}, 2, (sum_reducer,))
