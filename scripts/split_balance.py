"""How well a config's split balances the stages on this device: per-layer costs measured here (as
`pp.tune` measures them), then for each candidate split -- pp.run's default (`split.policy: cost`, FLOPs
estimated from the trace), an even split by layer count, and one balanced on the measured times -- each
stage's forward + backward time per microbatch and the simulated step time of the config's schedule.

One device is enough: the layers are measured one at a time and the pipeline is simulated.

    python scripts/split_balance.py CONFIG [--ranks 2] [--schedule 1F1B] [--microbatches 16] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _flops_starts(cfg, n_stages: int) -> list[int]:
    """The segment indices where pp.run's FLOPs-balanced split (`split_by_cost`) begins each stage."""
    from pp import pipeline
    from pp.launcher.models import build_model
    from pp.stage.policies import balanced_starts

    model = build_model(cfg.model, cfg.train.seed, device="meta")
    found: list = []

    def every_layer(segments):
        found[:] = list(segments)
        return list(range(len(segments)))

    tokens = torch.zeros((2, cfg.model.seq_len), dtype=torch.long, device="meta")
    pipeline(model, mb_args=(tokens,), split_policy=every_layer)
    return balanced_starts([max(s.flops, 1.0) for s in found], n_stages)


def _even_starts(layers, n_stages: int) -> list[int]:
    """Stages of equal layer counts (blocks only; `<before>` joins the first, `<after>` the last)."""
    blocks = [i for i, c in enumerate(layers) if c.cut is not None and not c.name.startswith("<")]
    per = len(blocks) / n_stages
    return [0] + [blocks[round(k * per)] for k in range(1, n_stages)]


def main(argv: list[str] | None = None) -> int:
    from pp.launcher.config import load_config
    from pp.schedules.actions import Kind
    from pp.schedules.registry import build_lists, get_spec
    from pp.schedules.simulate import simulate
    from pp.tune.measure import measure_layers
    from pp.tune.plan import balanced_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--schedule", default="1F1B")
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mb = cfg.train.batch_size // a.microbatches
    layers = measure_layers(cfg, device, [mb], iters=a.iters)[mb]
    spec = get_spec(a.schedule)
    n_stages = spec.n_stages(a.ranks, 1)
    placement, lists = build_lists(spec.name, a.ranks, a.microbatches, 1)
    rows = []
    for label, starts in (("flops (pp.run's split.policy: cost)", _flops_starts(cfg, n_stages)),
                          ("even (layer count)", _even_starts(layers, n_stages)),
                          ("measured", balanced_split(layers, n_stages, spec.split_backward))):
        bounds = list(starts) + [len(layers)]
        groups = [layers[bounds[k]:bounds[k + 1]] for k in range(n_stages)]
        costs = {s: {k: sum(getattr(c, f) for c in g) for k, f in (("F", "forward_s"), ("B", "backward_s"),
                                                                     ("I", "input_grad_s"), ("W", "weight_grad_s"))}
                 for s, g in enumerate(groups)}
        events = simulate(lists, placement, comm_cost=20e-6,
                          stage_costs={s: {Kind[k]: v for k, v in c.items()} for s, c in costs.items()})
        step = max(e.end for e in events) - min(e.start for e in events)
        per_stage = [round((c["F"] + c["B"]) * 1e3, 3) for c in costs.values()]
        names = [layers[i].name for i in starts]
        rows.append({"split": label, "stage_starts": names, "fwd_bwd_ms_per_stage": per_stage,
                     "simulated_step_ms": round(step * 1e3, 2)})
        print(f"{label:38s} starts {names}  fwd+bwd ms per stage {per_stage}  "
              f"simulated {a.schedule} step {step * 1e3:.1f} ms", flush=True)
    record = {"config": a.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "microbatch": mb, "microbatches": a.microbatches, "schedule": a.schedule, "ranks": a.ranks,
              "layers": [{"name": c.name, "fwd_ms": round(c.forward_s * 1e3, 3), "bwd_ms": round(c.backward_s * 1e3, 3)}
                         for c in layers], "splits": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
