"""Bad inputs to the splitter fail at the entry point with one sentence naming the bad value."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pp
from models import BATCH, D, MLP, DataDependent, MLPStack, MultiMLP, build, example
from pp import pipe_split


class _TwoSplitsInARow(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp0, self.mlp1 = MLP(), MLP()

    def forward(self, x):
        x = self.mlp0(x)
        pipe_split()
        pipe_split()
        return self.mlp1(x)


class _MutatesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        y = self.lin0(x)
        pipe_split()
        x.add_(1.0)  # the caller's tensor: the stages compute with it, and do not write it back
        return self.lin1(y) + x


class _SharedCounter(nn.Module):
    """A step counter read before and after the cut and advanced in forward: stage 0's copy would never
    see the update (once silently wrong from the second microbatch on)."""

    def __init__(self, read_after_cut: bool = True):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(D, D), nn.Linear(D, D)
        self.register_buffer("n", torch.zeros(()))
        self.read_after_cut = read_after_cut

    def forward(self, x):
        h = self.lin0(x) + self.n
        pipe_split()
        out = self.lin1(h) * (1 + self.n) if self.read_after_cut else self.lin1(h)
        self.n.add_(1)
        return out


class _CallsOneModuleTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp, self.out = MLP(), nn.Linear(D, D)

    def forward(self, x):
        return self.out(self.mlp(self.mlp(x)))


class _SplitAtTheEnd(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP()

    def forward(self, x):
        x = self.mlp(x)
        pipe_split()
        return x


def test_split_spec_naming_a_missing_submodule_raises_value_error_naming_it():
    with pytest.raises(ValueError, match=r"'layers\.7'.*MLPStack does not have.*did you mean 'layers\.3'"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),), split_spec={"layers.7": pp.SplitPoint.END})
    with pytest.raises(ValueError, match=r"'decoder'"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),), split_spec={"decoder": pp.SplitPoint.BEGINNING})


def test_split_spec_naming_a_module_forward_never_calls_is_an_error():
    # A ModuleList is iterated, never called: a cut named by it would be silently lost.
    with pytest.raises(ValueError, match=r"'layers', which MLPStack\.forward never calls.*one of its children"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),),
                    split_spec={"layers": pp.SplitPoint.BEGINNING, "layers.2": pp.SplitPoint.BEGINNING})


def test_split_spec_naming_a_module_called_twice_is_an_error():
    with pytest.raises(ValueError, match=r"'mlp', which _CallsOneModuleTwice\.forward calls 2 times"):
        pp.pipeline(_CallsOneModuleTwice(), (example(BATCH, D),), split_spec={"mlp": pp.SplitPoint.END})


def test_split_spec_leaves_the_model_as_it_was():
    model = build(MLPStack)
    pp.pipeline(model, (example(BATCH, D),), split_spec={"layers.2": pp.SplitPoint.BEGINNING})
    assert "forward" not in model.layers[2].__dict__
    with pytest.raises(ValueError):
        pp.pipeline(model, (example(BATCH, D),), split_spec={"layers": pp.SplitPoint.BEGINNING})
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_split_spec_with_a_value_that_is_not_a_split_point_is_an_error():
    with pytest.raises(ValueError, match=r"split_spec\['layers\.1'\] is 'end'.*SplitPoint"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),), split_spec={"layers.1": "end"})


def test_model_export_cannot_trace_raises_trace_error_naming_the_line_and_pipeline_stage(capfd):
    with pytest.raises(pp.PipelineTraceError) as err:
        pp.pipeline(build(DataDependent), (example(BATCH, D),))
    message = str(err.value)
    assert "models.py:" in message and "if x.sum() > 0" in message
    assert "data-dependent" in message
    assert "PipelineStage" in message
    # torch.export prints the partial graph to stderr when it fails: pp keeps that back
    assert "def forward" not in capfd.readouterr().err


def test_model_that_mutates_its_own_input_is_named_with_a_warning():
    """The traced graph computes on the new value (the stages are right: tests/test_field_inputs.py); the
    caller's tensor is not written back, which the warning says."""
    with pytest.warns(UserWarning, match=r"modifies its input 'x' in place.*leave the tensor you pass unchanged"):
        pipe = pp.pipeline(_MutatesItsInput(), (example(BATCH, D),))
    assert pipe.num_stages == 2


@pytest.mark.parametrize("read_after_cut", [True, False])
def test_a_buffer_updated_in_forward_and_read_on_another_stage_is_refused_for_a_schedule(read_after_cut):
    pipe = pp.pipeline(_SharedCounter(read_after_cut), (example(BATCH, D),))
    for stage in range(2):   # the Pipe called in one process shares the buffer: right; a stage is not
        with pytest.raises(ValueError, match=r"buffer 'n' is updated in forward on stage 1 and read on stages \[0"):
            pipe.build_stage(stage, "cpu")


def test_more_stages_than_layers_says_so():
    for policy in (pp.split_into_equal_size(9), pp.split_by_cost(9)):
        with pytest.raises(ValueError, match=r"9 stages: it has only 4 layers"):
            pp.pipeline(build(MLPStack), (example(BATCH, D),), split_policy=policy)


def test_number_of_stages_must_be_a_positive_integer():
    for make, n in ((pp.split_into_equal_size, 0), (pp.split_by_cost, -1), (pp.split_by_cost, 2.0)):
        with pytest.raises(ValueError, match=f"positive integer, got {n}"):
            make(n)


def test_split_spec_and_split_policy_together_is_an_error():
    with pytest.raises(ValueError, match=r"either split_spec or split_policy"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),), split_spec={"layers.1": pp.SplitPoint.BEGINNING},
                    split_policy=pp.split_into_equal_size(2))


def test_split_policy_on_a_model_that_calls_pipe_split_is_an_error():
    with pytest.raises(ValueError, match=r"already calls pipe_split\(\)"):
        pp.pipeline(build(MultiMLP), (example(BATCH, D),), split_policy=pp.split_into_equal_size(2))


@pytest.mark.parametrize("model, spec, empty", [
    (MLPStack, {"layers.0": pp.SplitPoint.END, "layers.1": pp.SplitPoint.BEGINNING}, "stage 1 of 3"),
    (MLPStack, {"layers.0": pp.SplitPoint.BEGINNING}, "stage 0 of 2"),
    (MLPStack, {"layers.3": pp.SplitPoint.END}, "stage 1 of 2"),
    (_TwoSplitsInARow, None, "stage 1 of 3"),
    (_SplitAtTheEnd, None, "stage 1 of 2"),
], ids=["two-cuts-at-one-place", "cut-before-everything", "cut-after-everything", "pipe-split-twice",
        "pipe-split-at-the-end"])
def test_cuts_that_leave_a_stage_empty_are_an_error(model, spec, empty):
    with pytest.raises(ValueError, match=f"{empty} would be empty"):
        pp.pipeline(build(model), (example(BATCH, D),), split_spec=spec)


def test_pipeline_of_something_that_is_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"nn\.Module, got function"):
        pp.pipeline(lambda x: x, (example(BATCH, D),))


def test_stage_index_out_of_range_is_an_error():
    pipe = pp.pipeline(build(MultiMLP, n=2), (example(BATCH, D),))
    with pytest.raises(ValueError, match=r"stage index 2 is out of range.*0\.\.1"):
        pipe.get_stage_module(2)


def test_calling_the_pipe_with_inputs_of_another_structure_is_an_error():
    pipe = pp.pipeline(build(MultiMLP, n=2), (example(BATCH, D),))
    with pytest.raises(TypeError, match=r"do not match the model's forward"):
        pipe(example(BATCH, D), example(BATCH, D))


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, n=2, scale=1.0):
        h = self.a(x) * scale * n
        pipe_split()
        return self.b(h)


@pytest.mark.parametrize("args, kwargs, want", [
    ((2,), {"scale": 3.0}, r"keyword 'scale' is 3\.0 but the model was traced with 1\.0"),
    ((5,), {"scale": 1.0}, r"positional input 1 is 5 but the model was traced with 2"),
])
def test_a_non_tensor_input_other_than_traced_is_named_as_the_caller_wrote_it(args, kwargs, want):
    x = torch.randn(2, D)
    pipe = pp.pipeline(_Scaled(), (x, 2), {"scale": 1.0})
    with pytest.raises(ValueError, match=want + "; non-tensor inputs are fixed at trace time"):
        pipe(x, *args, **kwargs)
