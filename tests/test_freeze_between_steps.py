"""Freezing or unfreezing a stage between steps (fine-tuning that thaws layers as it goes) changes
which outputs require grad, so what the stages send back: every rank exchanges metadata afresh and the
step equals the unsplit model with the same parameters frozen. Once refused with a message blaming
data-dependent shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pp.schedules.classes import schedule_class
from pp.schedules.registry import get_spec
from pp.testing import run_ranks
from runtime_models import DeepMLP, build_stages, reference

SCHEDULES = ["1F1B", "ZBVZeroBubble"]
N_MB = 4


def _freeze_then_thaw(rank: int, world: int) -> list[str]:
    for name in SCHEDULES:
        torch.manual_seed(0)
        model = DeepMLP(n_layers=8)
        x, y = torch.randn(8, 4), torch.randn(8, 3)
        stages, n_stages = build_stages(model, name, world, rank, x[:2])
        sched = schedule_class(name)(stages[0] if get_spec(name).stages_per_rank == 1 else stages, N_MB,
                                     loss_fn=F.mse_loss)
        held = {s.stage_index for s in stages}
        for frozen in (False, True, False):   # all trainable, stage 0 frozen, thawed again
            for s in stages:
                for p in s.submod.parameters():
                    p.grad = None
                    p.requires_grad_(not (frozen and s.stage_index == 0))
            # freezing some parameters leaves the others' gradients as they are: the unsplit model's
            want_losses, want_grads = reference(model, x, y, N_MB)
            losses: list = []
            sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
            for s in stages:
                for n, p in s.submod.named_parameters():
                    if frozen and s.stage_index == 0:
                        assert p.grad is None, (name, n)
                    else:
                        torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{name} {frozen} {n}: {m}")
            if n_stages - 1 in held:
                torch.testing.assert_close(torch.stack(losses), want_losses)
    return SCHEDULES


def test_freezing_and_thawing_the_first_stage_between_steps_equals_the_unsplit_model():
    assert run_ranks(_freeze_then_thaw, 2, timeout_s=180)[0] == SCHEDULES
