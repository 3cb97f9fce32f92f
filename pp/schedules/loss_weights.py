"""How each microbatch's loss gradient is weighted so that a step's gradient is the unsplit model's on the
whole batch: its share of the rows (`pp.microbatch.loss_scales`), or, for class-id targets of a token
mean, its share of the targets that are counted (not ignored), over every replica at dp > 1."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from ..microbatch import is_class_ids, class_id_tensors, loss_class_weights, loss_ignore_index, target_counts


def token_shares(targets: list, loss_fn: Callable, scale: Any, device: torch.device,
                 count_group: Any = None, whole: Any = None) -> Any:
    """Each microbatch's share of the batch's counted targets (n_m / N, 0-dim float32 tensors on `device`)
    where the targets are class ids: a mean over the targets that are not ignored (-100: padding, prompt
    tokens; or the loss's `ignore_index`; counted by their classes' `weight` where the loss states one) is
    then the unsplit model's token mean, however unevenly the ignored ones fall over the microbatches (a
    mean of microbatch means is not; transformers#34191).
    Equal to the rows' shares where none is ignored. With `count_group` (the dp replicas of
    `pp.parallelize`), N counts every replica's targets (an all-reduce) and the shares are x its size, as
    the replicas' gradients are averaged. `scale` (the rows' shares) where the targets are not class ids
    (or hold several integer tensors: `warn_ambiguous_class_ids`) or the loss states `ignore_index = None`. `whole`: the batch's target (counted in one pass where the
    microbatches are equal blocks of it). No host-device sync."""
    ignore_index = loss_ignore_index(loss_fn)
    counts = (None if ignore_index is None else
              target_counts(targets, ignore_index, device, loss_class_weights(loss_fn), whole))
    if counts is None:
        return scale
    total = counts.sum()
    if count_group is not None:
        dist.all_reduce(total, group=count_group)
        counts = counts * dist.get_world_size(count_group)
    return list((counts / total.clamp_min(1)).unbind())


def _loss_name(loss_fn: Callable) -> str:
    """The loss function's own name (step's loss_kwargs wrap it in a partial)."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def warn_unstated_reduction(loss_fn: Callable, shares: list[float]) -> None:
    """An uneven split weights microbatches by their rows (or counted targets), right only for a loss that
    is a mean over them; a plain function does not say whether it is (once per schedule: its caller's)."""
    name = _loss_name(loss_fn)
    warnings.warn(f"the batch splits into microbatches of unequal rows, so their gradients are weighted by rows "
                  f"({', '.join(f'{w:.3g}' for w in shares)}; by counted targets for class ids): right for a loss "
                  f"that is a mean over them, wrong "
                  f"for a sum. loss_fn {name!r} states no reduction; if it sums, give it one: "
                  f"functools.partial(F.mse_loss, reduction='sum'), or set loss_fn.reduction = 'sum' "
                  f"(or 'mean' to silence this)", stacklevel=3)


def warn_ambiguous_class_ids(target: Any, loss_fn: Callable) -> bool:
    """Warn where a structured target holds several integer tensors and the loss may skip ignored class
    ids: which one it reads cannot be told, so the microbatches are weighted by rows, exact only where
    none is ignored (once per schedule: its caller's). Whether it warned."""
    if len(class_id_tensors(target)) < 2 or loss_ignore_index(loss_fn) is None:   # the cheap test first
        return False
    paths = [pytree.keystr(p) for p, x in pytree.tree_flatten_with_path(target)[0] if is_class_ids(x)]
    warnings.warn(f"the target holds several integer tensors ({', '.join(f'target{p}' for p in paths)}), so pp "
                  f"cannot tell which holds the class ids whose ignored entries (-100, or the loss's ignore_index) "
                  f"a token mean skips: microbatches are weighted by rows, not by counted targets, which is exact "
                  f"only where none is ignored; make the class ids the target's only integer tensor (a mask as "
                  f"bool, weights as float), or set loss_fn.ignore_index = None if nothing is ignored",
                  stacklevel=4)
    return True


def warn_labels_mean(mb_kwargs: list[dict], ignore_index: int = -100) -> bool | None:
    """Warn where the model is given `labels=` whose ignored entries (-100) fall unevenly over the
    microbatches: a model's own loss (Hugging Face's `out.loss`) is each microbatch's mean over its counted
    labels, which pp cannot see, so weighting microbatches by rows is not the unsplit model's token mean
    (transformers#34191). Counted both as given and shifted by one (a causal LM's `labels[:, 1:]`).
    True where it warned, False where labels with ignored entries fall evenly, None where there are none
    to check (no `labels` tensor of integers, or none ignored). One host sync: the caller checks a few
    steps only."""
    labels = [k.get("labels") for k in mb_kwargs]
    if not labels or not all(isinstance(x, torch.Tensor) and is_class_ids(x) and x.dim() >= 1 for x in labels):
        return None
    rows = torch.tensor([float(x.shape[0]) for x in labels])
    counts = torch.stack([torch.stack([(x != ignore_index).sum(), (x[..., 1:] != ignore_index).sum()
                                       if x.dim() > 1 else (x != ignore_index).sum()])   # (B,): one per row
                          for x in labels]).float().cpu()   # (microbatches, 2): as given, shifted
    full = torch.tensor([float(x.numel()) for x in labels])
    if bool((counts[:, 0] == full).all()):
        return None   # nothing ignored: rows are right
    shares = counts / counts.sum(0).clamp_min(1)
    even = ((shares - (rows / rows.sum()).unsqueeze(1)).abs() <= 1e-3 * shares.abs() + 1e-6).all(0)
    if bool(even.any()):   # as given (a masked LM) or shifted (a causal LM): one of them is the model's count
        return False
    warnings.warn("step() passes labels= whose ignored entries (-100) fall unevenly over the microbatches "
                  f"(counted labels per microbatch: {', '.join(str(int(c)) for c in counts[:, 1])}); if loss_fn "
                  "returns the model's own loss (out.loss: each microbatch's mean over its counted labels), "
                  "weighting the microbatches by rows differs from the unsplit model's token mean. Compute the "
                  "loss from the logits against target= (pp then weights by counted targets), or sum it and "
                  "divide by the batch's count with scale_grads=False (a Hugging Face model does that given "
                  "num_items_in_batch=; docs/splitter.md)", stacklevel=4)
    return True


class MaskWatch:
    """Catches a `loss_fn` that changes which targets count by masking the target in place
    (`t[t == pad] = -100`) while microbatches are weighted by counted targets (`token_shares`): those
    counts were taken before the loss ran, so the step's gradient weights microbatches by their pre-mask
    counts, not the unsplit model's token mean over the batch. Per microbatch of the first `steps`
    training steps: one count of its class ids before the loss (no host-device sync), and a host-side
    look at their version counter after it; only where the counter moved, a recount and one host sync.
    Warns once (then stops watching) where the count changed. A mask that builds a new tensor
    (`torch.where`) leaves the target as it was and cannot be seen: mask before `step()`."""

    __slots__ = ("loss_fn", "ignore_index", "weight", "steps", "warned")

    def __init__(self, steps: int = 3):
        self.loss_fn, self.ignore_index, self.weight, self.steps, self.warned = None, None, None, steps, False

    def use(self, loss_fn: Callable) -> "MaskWatch":
        """Watch this step's `loss_fn` (the schedule's, with the step's loss keywords); one step less."""
        self.loss_fn, self.steps = loss_fn, self.steps - 1
        self.ignore_index, self.weight = loss_ignore_index(loss_fn), loss_class_weights(loss_fn)
        return self

    def before(self, target: Any) -> tuple | None:
        """What `after` compares with: the class ids, their version and their count (a device tensor)."""
        ids = class_id_tensors(target)
        if self.warned or len(ids) != 1 or ids[0].dim() == 0 or self.ignore_index is None:
            return None
        count = target_counts([target], self.ignore_index, ids[0].device, self.weight)
        return None if count is None else (ids[0], ids[0]._version, count)

    def after(self, seen: tuple | None, microbatch: int) -> None:
        """Warn where the loss changed the count of the class ids `before` saw (once: then `steps` is 0)."""
        if seen is None or seen[0]._version == seen[1]:   # not modified in place: nothing to check
            return
        ids, _, count = seen
        now = target_counts([ids], self.ignore_index, ids.device, self.weight)
        if now is None or bool(torch.equal(now, count)):   # the host sync: only where the target was modified
            return
        self.steps, self.warned = 0, True
        warnings.warn(f"loss_fn {_loss_name(self.loss_fn)!r} modified its target in place and changed how many "
                      f"targets count (microbatch {microbatch}: {float(count[0]):g} before the loss, "
                      f"{float(now[0]):g} after; "
                      f"ignored ones are {self.ignore_index}): pp weights each microbatch's gradient by the targets "
                      f"it counts before the loss runs, so this step's gradient is not the unsplit model's token "
                      f"mean over the batch. Mask the target before step() (e.g. y[y == pad] = -100), or return a "
                      f"sum and divide by the batch's count yourself with scale_grads=False", stacklevel=2)
