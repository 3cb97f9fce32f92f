"""The training loop: this rank's stages, AdamW with warm-up + cosine LR and global gradient clipping,
one schedule step per optimizer step, metrics, checkpoints and the end-of-run summary.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import torch

from pp.comms.collectives import all_gather

from . import checkpoint as ckpt
from . import collectives as coll
from .config import JobConfig
from pp.data import TokenBatches, open_stream
from pp.weights import WeightValuesError
from .job import Job
from .rank import build_rank, lm_loss, next_token_loss  # noqa: F401 - lm_loss is public here too
from .metrics import BubbleMeter, MetricsWriter, chrome_trace, peak_memory_gib, summary_lines
from .models import init_options
from .profiling import profiled
from .progress import Progress
from .sinks import ScalarSinks
from .stopping import StopSignals, Stopped


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message names the step."""


def lr_at(step: int, cfg: JobConfig) -> float:
    """Learning rate of (1-based) `step`: linear warm-up, then cosine decay to lr * min_lr_ratio."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else t.steps // 10
    if step <= warmup:
        return t.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, t.steps - warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def precision_change(then: str, now: str) -> str:
    """What resuming a checkpoint saved at train.precision `then` at precision `now` changes."""
    if then == "bf16":
        weights = "the weights and AdamW state were saved in bfloat16 and go on from those values in float32"
    elif now == "bf16":
        weights = "the float32 weights and AdamW state are rounded to bfloat16 as they load"
    else:   # fp32 <-> bf16-mixed: bf16-mixed keeps float32 masters, so the checkpoint is the same kind
        weights = "the float32 weights and AdamW state load exactly (bf16-mixed keeps float32 masters)"
    compute = {"fp32": "float32", "bf16-mixed": "bfloat16 under autocast", "bf16": "bfloat16"}.get(now, now)
    return (f"{weights}, and the steps after it compute in {compute}, so their losses are not those the run "
            f"that saved it would have had")


def step_seed(seed: int, step: int, rank: int) -> int:
    """Every step re-seeds torch's RNGs from (seed, step, rank): a resumed run draws the same numbers."""
    return (seed * 1_000_003 + step) * 4099 + rank


class Trainer:
    """Runs the loop on one rank; rank 0 logs, writes metrics and the trace."""

    def __init__(self, job: Job, rank: int, device: torch.device, log=print, *,
                 stop: StopSignals | None = None, lock: Any = None):
        self.job, self.cfg, self.rank, self.device = job, job.cfg, rank, device
        self.stop = stop        # installed stop-signal handlers (pp.run installs them first thing)
        self.lock = lock        # rank 0's OutputLock: carries the steps redone across torchrun restarts
        self.stop_signal = 0    # the signal every rank agreed to stop on, after the step that saw it
        self.steps_redone = 0
        self.log = log if rank == 0 else (lambda *_: None)
        self.rs = build_rank(job, device)
        self.ckpt_root = os.path.join(self.cfg.output.dir, "checkpoints")
        rs = self.rs
        self.batches, self.eval_batches = self._data() if (rs.has_first or rs.has_last) else (None, None)
        self.bubble = BubbleMeter()
        self.current_step = 0  # the step under way, for the message if this rank fails
        self.step_bubble: float | None = None

    def _data(self) -> tuple[TokenBatches, TokenBatches | None]:
        """Training batches, and evaluation batches when eval.every > 0 (eval.data, or a held-out tail
        of the training data that training then never reads). Their ids are checked now, before this run
        writes or removes anything (an earlier run's checkpoints go after the first step): every
        evaluation batch, and the whole training data where no recorded vocabulary bounds it (the
        batches check what they read in any case)."""
        t, e, seq, vocab = self.cfg.train, self.cfg.eval, self.cfg.model.seq_len, self.cfg.model.vocab_size
        stream = open_stream(t.data, t.data_dtype, t.tokenizer, seq)
        hi, held_out = len(stream), None
        if e.every > 0 and e.data is None:
            hi = len(stream) - int(len(stream) * e.split)
            held_out = TokenBatches(stream, t.batch_size, seq, t.seed, lo=hi, vocab_size=vocab, salt=1)
        elif e.every > 0:
            held_out = TokenBatches(open_stream(e.data, t.data_dtype, t.tokenizer, seq, key="eval.data"), t.batch_size, seq, t.seed,
                                    vocab_size=vocab, salt=1)
        if held_out is not None:
            held_out.check(e.steps)
        stream.check_ids(vocab)
        return TokenBatches(stream, t.batch_size, seq, t.seed, hi=hi, vocab_size=vocab), held_out

    def evaluate(self) -> dict:
        """Forward-only pipeline passes over eval.steps held-out batches (the same batches every time):
        the mean next-token loss over all of them and its perplexity, on every rank (collective)."""
        rs, m, dev = self.rs, self.rs.model, self.device
        total, count = 0.0, 0
        for stage in m.stages:
            stage.submod.eval()
        try:
            for k in range(self.cfg.eval.steps):
                args = (m.local_share(self.eval_batches.tokens(k)).to(dev),) if rs.has_first else ()
                out = m.eval(*args)
                if m.owns_loss:
                    target = m.local_share(self.eval_batches.targets(k)).to(dev)
                    total += float(next_token_loss(out, target)) * target.numel()
                    count += target.numel()
        finally:
            for stage in m.stages:
                stage.submod.train()
        rows = coll.all_gather_object((total, count)) if coll.active() else [(total, count)]
        loss = sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # --- resume ---------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest complete checkpoint when asked to; return the number of steps already done."""
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        resume = self.cfg.checkpoint.resume or restarts > 0
        if self.rank == 0:
            for name in ckpt.remove_partial_saves(self.ckpt_root):
                self.log(f"removed {name}: a checkpoint save that never finished")
        coll.barrier()
        if not resume:
            return 0
        if restarts and not self.cfg.checkpoint.resume:
            self.log(f"torchrun restart {restarts}: resuming from the newest checkpoint")
        path = ckpt.find_latest(self.ckpt_root, log=self.log)
        if path is None and ckpt.list_steps(self.ckpt_root):
            # every one is damaged: start fresh, but keep them under other names (a fresh run removes its
            # output.dir's step-<N> checkpoints after its first step, and they may be repairable)
            kept = ckpt.set_aside_damaged(self.ckpt_root) if self.rank == 0 else []
            coll.barrier()
            self.log(f"no usable checkpoint in {self.ckpt_root} (every one is damaged): starting fresh; kept "
                     f"them as {', '.join(kept)}")
            return 0
        if path is None:
            self.log(f"no checkpoint in {self.ckpt_root}: starting fresh")
            return 0
        manifest = ckpt.read_manifest(path)
        # the damaged ones newer than it: set aside, so that `keep` never counts them among the newest
        # problem() checked that the manifest's step is the directory's (a copied step-10 named step-30 is damaged)
        kept = ckpt.set_aside_damaged(self.ckpt_root, int(manifest["step"])) if self.rank == 0 else []
        coll.barrier()
        if kept:
            self.log(f"kept the damaged checkpoint(s) as {', '.join(kept)}")
        ckpt.check_same_model(path, manifest.get("model"), self.cfg.to_dict()["model"])  # same on every rank
        ckpt.check_same_tokenizer(path, manifest.get("tokenizer"), self.token_ids)
        try:
            self.rs.load(path)
        except WeightValuesError as e:   # non-finite weights (saved with train.nan_check off): no step could use them
            raise ckpt.CheckpointError(f"checkpoint {path} cannot be resumed: {e.detail}") from None
        saved = ", ".join(f"{k}={manifest[k]}" for k in ("pp", "dp", "tp") if k in manifest)
        self.log(f"resumed from {path} (step {manifest['step']}, saved with {saved or 'pp=?'})")
        then, now = manifest.get("lr_schedule"), self._lr_schedule()
        if manifest["step"] >= self.cfg.train.steps:
            self.log(f"note: the checkpoint is at step {manifest['step']} and train.steps is {self.cfg.train.steps}: "
                     f"nothing is left to train (raise train.steps to train on)")
        elif then is not None and then != now:
            changed = ", ".join(f"train.{k} {then.get(k)} -> {now[k]}" for k in now if then.get(k) != now[k])
            self.log(f"note: the learning-rate schedule changed since step {manifest['step']} was saved "
                     f"({changed}): the steps after it follow the new one, not the run that saved it")
        then = manifest.get("data_order") or ({"seed": manifest["seed"]} if "seed" in manifest else {})
        now = self._data_order()
        changed = ", ".join(f"train.{k} {then[k]!r} -> {now[k]!r}" for k in then if k in now and then[k] != now[k])
        if changed and manifest["step"] < self.cfg.train.steps:
            self.log(f"note: {changed} since step {manifest['step']} was saved: the batches (and dropout) of the "
                     f"steps after it are not those the run that saved it would have drawn")
        then, now = manifest.get("precision"), self.cfg.train.precision
        if then is not None and then != now and manifest["step"] < self.cfg.train.steps:
            self.log(f"note: train.precision {then} -> {now} since step {manifest['step']} was saved: "
                     f"{precision_change(then, now)}")
        then, now = manifest.get("activations_in_bf16"), self.cfg.train.activations_in_bf16
        if then is not None and then != now and self.cfg.train.precision == "bf16-mixed" \
                and manifest["step"] < self.cfg.train.steps:
            self.log(f"note: train.activations_in_bf16 {str(then).lower()} -> {str(now).lower()} since step "
                     f"{manifest['step']} was saved: activations now cross stages "
                     f"{'in bfloat16' if now else 'as computed'}, so the losses after it differ by rounding "
                     f"from those the run that saved it would have had")
        return int(manifest["step"])

    @functools.cached_property
    def token_ids(self) -> dict | str | None:
        """What the data's token ids mean, for the manifest's `tokenizer`: {path, sha256} of the
        train.tokenizer that tokenizes text data, "bytes" for text read as bytes, None for token files (pp
        does not tokenize them: their ids are as `pp.data prepare` made them). Hashed once per run."""
        from pp.data.tokenize import file_sha256

        from .data import STDLIB
        from .validate import _token_files

        t = self.cfg.train
        if t.data != STDLIB and _token_files(t.data):
            return None
        if t.tokenizer is None or t.data == STDLIB:
            return "bytes"
        return {"path": os.path.abspath(t.tokenizer), "sha256": file_sha256(t.tokenizer)}

    def _data_order(self) -> dict:
        """The keys that decide each step's batch and random draws (with the step: `step_seed`)."""
        t = self.cfg.train
        return {"seed": t.seed, "data": t.data, "batch_size": t.batch_size}

    def _lr_schedule(self) -> dict:
        """The keys that shape the learning rate of every step (`lr_at`)."""
        t = self.cfg.train
        return {"steps": t.steps, "lr": t.lr, "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio}

    def init_weights(self, path: str) -> None:
        """Collective: fill this rank's stages from model.init_from (each rank reads its own tensors);
        WeightsError, raised on every rank before any copy, if they do not fit."""
        from pp.weights import WeightsError, load_weights, open_weights

        from .job import converted_init_from

        t = time.perf_counter()
        try:
            source = open_weights(path)
            what = source.what
            load_weights(self.rs.model, source, **init_options(self.cfg.model))
        except WeightValuesError as e:   # names fit: another layout would not mend the values
            raise WeightsError(f"model.init_from={path!r}: {e}") from None
        except WeightsError as e:
            converted = converted_init_from(self.cfg.model)   # checked by prepare (job.check_init_from)
            if converted is None:
                raise WeightsError(f"model.init_from={path!r}: {e}") from None
            load_weights(self.rs.model, converted, **init_options(self.cfg.model))
            what = f"{path} (as transformers' from_pretrained converts it)"
        finally:
            from pp.hf import forget_converted

            forget_converted()
        self.log(f"initialised the weights from {what} in {time.perf_counter() - t:.1f}s")

    # --- one step -------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        cfg, rs = self.cfg, self.rs
        m = rs.model
        t0 = time.perf_counter()
        # tp ranks draw alike: replicated regions must see the same random numbers
        torch.manual_seed(step_seed(cfg.train.seed, step, m.pp_rank * m.dp + m.dp_rank))
        lr = lr_at(step, cfg)
        for g in rs.optimizer.param_groups:
            g["lr"] = lr
        rs.optimizer.zero_grad(set_to_none=True)
        args, kwargs, losses = (), {}, []
        if rs.has_first:  # this data-parallel replica's share of the global batch
            args = (m.local_share(self.batches.tokens(step)).to(self.device, non_blocking=True),)
        if rs.has_last:
            target = m.local_share(self.batches.targets(step)).to(self.device, non_blocking=True)
            kwargs = {"target": target, "losses": losses}
        t_sched = time.perf_counter()
        m.step(*args, **kwargs)
        sched_s = time.perf_counter() - t_sched
        stats = self._gather_stats(losses)
        loss, grad_norm, bad_mb = stats["loss"], stats["grad_norm"], stats["bad_microbatch"]
        self.stop_signal = stats["stop_signal"]
        if cfg.train.nan_check and bad_mb >= 0:
            raise TrainingError(f"step {step}: the loss of microbatch {bad_mb} is not finite "
                                f"(train.nan_check stops here; lower train.lr or check the data)")
        if cfg.train.nan_check and not math.isfinite(grad_norm):
            raise TrainingError(f"step {step}: the gradient norm is not finite ({grad_norm})")
        if cfg.train.grad_clip > 0 and grad_norm > cfg.train.grad_clip:
            scale = cfg.train.grad_clip / (grad_norm + 1e-6)
            rs.model.scale_grads(scale)
        rs.optimizer.step()
        events = rs.schedule.trace_events() if hasattr(rs.schedule, "trace_events") else []
        self.bubble.add_step(events, sched_s)
        one = BubbleMeter()
        one.add_step(events, sched_s)
        self.step_bubble = one.fraction()
        dt = time.perf_counter() - t0
        tokens = cfg.train.batch_size * cfg.model.seq_len
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
               "step_time_s": dt}
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = stats["peak_mem_gib"]
        return rec

    def _gather_stats(self, losses: list) -> dict:
        """One all-gather per step: squared grad norm, loss sum and count, first bad microbatch, peak memory,
        and a stop signal this rank received (so every rank agrees on a stop after the same step)."""
        rs = self.rs
        row = torch.zeros(6, device=self.device, dtype=torch.float32)
        row[5] = float(self.stop.received) if self.stop is not None else 0.0
        row[0] = rs.model.grad_norm_sq()   # every parameter, tp shard and replica counted once
        if rs.model.owns_loss and losses:  # one rank per replica: the mean is over all microbatches
            ls = torch.stack([l.detach().float().reshape(()) for l in losses])
            row[1] = ls.sum()
            row[2] = len(losses)
            finite = torch.isfinite(ls)
            row[3] = torch.where(finite.all(), -1.0, (~finite).float().argmax().float())
        else:
            row[3] = -1.0
        if self.device.type == "cuda":
            row[4] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rows = (all_gather(row.unsqueeze(0)) if coll.active() else row.unsqueeze(0)).tolist()
        n = sum(r[2] for r in rows)
        bad = max(r[3] for r in rows)
        return {"grad_norm": math.sqrt(sum(r[0] for r in rows)), "loss": sum(r[1] for r in rows) / max(n, 1),
                "bad_microbatch": int(bad), "peak_mem_gib": max(r[4] for r in rows),
                "stop_signal": int(max(r[5] for r in rows))}

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        own_stop = self.stop is None
        if own_stop:
            self.stop = StopSignals(cfg.checkpoint.on_signal)
        abort = getattr(self.rs.model.schedule, "_abort", None)
        self.stop.arm(cfg.parallel.timeout_s, abort.failure if abort is not None else (lambda: None),
                      lambda: f"rank {self.rank} at step {self.current_step}")
        done = self.resume()
        if done == 0 and cfg.model.init_from:
            self.init_weights(cfg.model.init_from)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        writer = MetricsWriter(cfg.output.dir, done) if self.rank == 0 else None
        if writer is not None:
            # records past the checkpoint this run resumed from are steps that must run again
            redone = writer.dropped if (cfg.checkpoint.resume or restarts > 0) else 0
            self.steps_redone = (self.lock.steps_redone_before if self.lock is not None else 0) + redone
            if self.lock is not None:
                self.lock.record_steps_redone(self.steps_redone)
        progress = Progress(cfg.train.steps, done + 1, cfg.train.log_every) if self.rank == 0 else None
        if progress is not None:
            self.log = progress.print  # messages end a live progress bar's line first
        sinks = (ScalarSinks(cfg.output.dir, done, cfg.output.tensorboard, cfg.output.wandb, cfg.to_dict())
                 if self.rank == 0 and (cfg.output.tensorboard or cfg.output.wandb) else None)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start, steps_run, steady_s, steady_n, timed_s = time.perf_counter(), 0, 0.0, 0, 0.0
        stopped: Stopped | None = None
        try:
            for step in range(done + 1, cfg.train.steps + 1):
                self.current_step = step
                with profiled(step == cfg.output.profile_step, cfg.output.dir, self.rank, self.device):
                    rec = self.step(step)
                if done == 0 and steps_run == 0:
                    self.drop_earlier_run()
                if self.stop_signal:  # every rank agreed to stop after this step: no watchdog needed
                    self.stop.stand_down()
                steps_run += 1
                timed_s += rec["step_time_s"]
                # the first step also learns shapes and warms up kernels; a profiled step runs slower
                if steps_run > 1 and step != cfg.output.profile_step:
                    steady_s += rec["step_time_s"]
                    steady_n += 1
                every = cfg.eval.every
                if every > 0 and (step % every == 0 or step == cfg.train.steps):
                    rec.update(self.evaluate())
                if writer is not None:
                    writer.write(rec)
                    progress.update(step, rec["loss"], rec["lr"], rec["tokens_per_s"], rec["step_time_s"])
                    if "val_loss" in rec:
                        progress.validation(step, rec["val_loss"], rec["val_ppl"])
                if sinks is not None:
                    sinks.write({**rec, "bubble": self.step_bubble})
                saved = cfg.checkpoint.every > 0 and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps)
                if saved:
                    self.save(step)
                    if sinks is not None:
                        sinks.flush()
                if self.stop_signal and step < cfg.train.steps:
                    if not saved:
                        self.save(step)
                    stopped = Stopped(self.stop_signal, step, f"checkpoints/step-{step}")
                    break
        finally:
            self.stop.stand_down()  # stopping at a boundary, or ending with an error: either way, leaving
            if writer is not None:
                writer.close()
                progress.close()
            if sinks is not None:
                sinks.close()
            if own_stop:
                self.stop.uninstall()
        summary = self.finish(steps_run, time.perf_counter() - t_start, steady_s, steady_n, timed_s)
        if stopped is not None:
            raise stopped
        return summary

    def drop_earlier_run(self) -> None:
        """Collective, after this fresh run's first step: remove the checkpoints an earlier run left in
        output.dir (a fresh run owns it; an old step-<N> would later be taken for this run's newest).
        Done only now, so that a run that fails at start-up or in its first step (bad data, out of
        memory) leaves the earlier run's output as it was."""
        if self.rank == 0 and ckpt.list_steps(self.ckpt_root):
            old = ckpt.remove_checkpoints(self.ckpt_root)
            self.log(f"removed {len(old)} checkpoint(s) of an earlier run from {self.ckpt_root} "
                     f"(checkpoint.resume is false)")
        coll.barrier()

    def save(self, step: int) -> None:
        t = time.perf_counter()
        meta = {"pp": self.job.layout.pp, "dp": self.cfg.parallel.dp, "tp": self.cfg.parallel.tp,
                "schedule": self.job.layout.schedule,
                "model": self.cfg.to_dict()["model"], "seed": self.cfg.train.seed, "lr_schedule": self._lr_schedule(),
                "data_order": self._data_order(), "tokenizer": self.token_ids,
                "precision": self.cfg.train.precision, "activations_in_bf16": self.cfg.train.activations_in_bf16}
        path = ckpt.save(self.ckpt_root, step, self.rs.state(), meta, verify=self.cfg.checkpoint.verify,
                         keep=self.cfg.checkpoint.keep)
        self.log(f"saved checkpoint {path} in {time.perf_counter() - t:.1f}s")

    def finish(self, steps_run: int, seconds: float, steady_s: float, steady_n: int, timed_s: float = 0.0) -> dict:
        """Gather per-rank figures; rank 0 prints the summary and writes summary.json and trace.json.

        `steady_s` is the time of the `steady_n` steady steps of this run (steps 2.., without the profiled
        step and checkpoint saves); `timed_s` that of all `steps_run` steps (evaluation and saves excluded),
        what throughput falls back to when no steady step ran (a 1-step run, a resume one step from the end).
        """
        mine = {"rank": self.rank, "stages": self.rs.stage_ids, "bubble": self.bubble.fraction(),
                "peak_mem_gib": peak_memory_gib(self.device), "events": self.bubble.last_events}
        replays = getattr(self.rs.schedule, "cuda_graph_replays", {})
        if replays:
            mine["graph_replays"] = sum(replays.values())
        if self.cfg.schedule.compile:
            mine["compiles"] = self.rs.schedule.compile_count
        per_rank = coll.all_gather_object(mine)
        tokens = steps_run * self.cfg.train.batch_size * self.cfg.model.seq_len
        per_step = self.cfg.train.batch_size * self.cfg.model.seq_len
        if steady_n > 0 and steady_s > 0:
            step_s, measured_over = steady_s / steady_n, "steps after the first, checkpoint saves excluded"
        elif steps_run > 0 and timed_s > 0:
            step_s, measured_over = timed_s / steps_run, "the first step alone, warm-up included: no later step ran"
        else:
            step_s, measured_over = 0.0, "no step ran"
        steady = per_step / step_s if step_s > 0 else 0.0
        summary = {"steps": steps_run, "tokens": tokens, "seconds": seconds, "tokens_per_s": steady,
                   "throughput_over": measured_over,
                   "steps_redone": self.steps_redone,
                   "ranks": [{k: v for k, v in r.items() if k != "events"} for r in per_rank]}
        tuned = self.job.tuned
        if tuned:  # schedule.name auto: the simulator's prediction beside the steady-state step time
            measured = step_s
            summary.update(tuned=tuned, predicted_step_s=tuned["predicted_step_s"], measured_step_s=measured,
                           step_time_ratio=measured / max(tuned["predicted_step_s"], 1e-12))
        if self.rank == 0:
            if tuned:
                self.log(f"schedule auto ({tuned['schedule']}): predicted step {summary['predicted_step_s'] * 1e3:.2f} "
                         f"ms, measured {summary['measured_step_s'] * 1e3:.2f} ms (measured / predicted "
                         f"{summary['step_time_ratio']:.2f})")
            for line in summary_lines(steps_run, tokens, seconds, steady, summary["ranks"], self.device.type,
                                      steps_redone=self.steps_redone, measured_over=measured_over):
                self.log(line)
            out = self.cfg.output.dir
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            if self.cfg.output.trace and any(r["events"] for r in per_rank):
                with open(os.path.join(out, "trace.json"), "w") as f:
                    json.dump(chrome_trace({r["rank"]: r["events"] for r in per_rank}), f)
        return summary
