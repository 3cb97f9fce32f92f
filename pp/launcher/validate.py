"""Checks of a whole job config against itself, the schedule registry and the world size.

All of it runs before any process-group work, on every rank alike, so that a bad config ends the job
with one line (printed by rank 0) instead of a hang or a traceback per rank.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass

import torch

from .config import CHOICES, DTYPE_PRECISION, ConfigError, JobConfig, is_custom_model, is_hf_model
from .stopping import signal_number

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Layout:
    """Where the stages live: `n_stages` stages over `pp` ranks, placed as the schedule needs."""

    schedule: str                 # the registry's name of the schedule
    pp: int
    stages_per_rank: int
    placement: tuple[int, ...]    # rank of each stage

    @property
    def n_stages(self) -> int:
        return len(self.placement)

    def rank_of(self, stage: int) -> int:
        return self.placement[stage]

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.placement) if r == rank]


def schedule_names() -> list[str]:
    from pp.schedules.registry import SCHEDULES

    return list(SCHEDULES)


def _norm(name: str) -> str:
    name = name.lower().replace("_", "").replace("-", "")
    name = name[len("schedule"):] if name.startswith("schedule") else name
    return name.replace("one", "1")   # "OneFOneB" is 1F1B spelled out


def resolve_schedule(name: str) -> str:
    """The registry's spelling of schedule `name` (case and a 'Schedule' prefix do not matter)."""
    names = schedule_names()
    by_norm = {_norm(n): n for n in names}
    if _norm(name) in by_norm:
        return by_norm[_norm(name)]
    close = difflib.get_close_matches(_norm(name), list(by_norm), n=1, cutoff=0.4)
    hint = f" (did you mean {by_norm[close[0]]!r}?)" if close else ""
    raise ConfigError(f"schedule.name={name!r} is not a schedule pp ships{hint}; choose one of {', '.join(names)}, "
                      f"or auto")


def _lower_choices(cfg: JobConfig) -> None:
    """A value of a one-of-a-few-words key written in another case (precision: BF16) becomes the word,
    as schedule.name ignores case; anything else is left for the key's own check to name."""
    for key, words in {**CHOICES, "train.dtype": tuple(DTYPES)}.items():
        section, name = key.split(".")
        part = getattr(cfg, section)
        value = getattr(part, name)
        if isinstance(value, str) and value not in words and value.lower() in words:
            setattr(part, name, value.lower())


def _finite_numbers(cfg: JobConfig) -> None:
    """No key takes nan or infinity (YAML's .nan/.inf, or "nan" on the command line): a learning rate or
    weight decay of nan would only show as a non-finite loss steps later, a grad_clip of nan never clips."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}={value!r}: expected a finite number")


def validate(cfg: JobConfig, world_size: int) -> Layout:
    """Raise ConfigError for the first bad value; return the stage layout the config asks for."""
    _lower_choices(cfg)
    _finite_numbers(cfg)
    _check_model(cfg)
    _check_train(cfg)
    layout = _check_parallel(cfg, world_size)
    _check_output(cfg)
    check_memory_budget(cfg)
    return layout


def check_memory_budget(cfg: JobConfig) -> None:
    """schedule.memory_budget_gib must be null or a positive number of GiB."""
    b = cfg.schedule.memory_budget_gib
    if b is not None and not b > 0:
        raise ConfigError(f"schedule.memory_budget_gib={b!r}: expected a positive number of GiB per rank, or "
                          f"null for the device's free memory less a margin")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r}: expected a {'non-negative' if allow_zero else 'positive'} number")


def _check_model(cfg: JobConfig) -> None:
    m = cfg.model
    if m.name not in ("gpt", "mlp") and not is_custom_model(m.name) and not is_hf_model(m.name):
        raise ConfigError(f"model.name={m.name!r} is unknown: use 'gpt', 'mlp', 'hf:ClassName' or "
                          f"'package.module:ClassName'")
    _positive("model.seq_len", m.seq_len)
    byte_data = cfg.train.tokenizer is None and not _token_files(cfg.train.data)
    if m.vocab_size < 256 and byte_data:
        src = " (from model.config)" if is_hf_model(m.name) else ""
        raise ConfigError(f"model.vocab_size={m.vocab_size}{src}: byte-level data (train.data={cfg.train.data!r}) "
                          f"needs at least 256")
    if is_hf_model(m.name):
        _check_hf_sizes(m)
        return
    if is_custom_model(m.name):
        return
    _positive("model.d_model", m.d_model)
    _positive("model.n_layers", m.n_layers)
    _positive("model.d_ff", m.d_ff, allow_zero=True)
    if m.name == "gpt":
        _positive("model.n_heads", m.n_heads)
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}")


def _check_hf_sizes(m) -> None:
    """The architecture's own vocabulary must hold the data's tokens, and learned positions the sequence."""
    from pp.hf import hf_class, sizes_from_config

    config = hf_class(m.name).config_class.from_dict(m.config)
    sizes = sizes_from_config(config)
    if sizes["vocab_size"] is not None and sizes["vocab_size"] < m.vocab_size:
        raise ConfigError(f"model.config has vocab_size={sizes['vocab_size']}, fewer than the "
                          f"{m.vocab_size} token ids of the data (model.vocab_size); the byte-level data needs "
                          f"at least 256")
    # learned absolute positions (a table of max_position_embeddings rows): BERT's and GPT-2's families;
    # rotary and relative positions have no table to run past
    kind = getattr(config, "position_embedding_type", None)
    learned = kind == "absolute" or (kind is None and (hasattr(config, "n_positions")
                                                       or getattr(config, "model_type", "") in _LEARNED_POSITIONS))
    limit = sizes["seq_len"]
    if learned and limit is not None and getattr(config, "model_type", "") in _POSITIONS_AFTER_PADDING:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1   # RoBERTa counts positions from pad + 1
    if learned and limit is not None and m.seq_len > limit:
        raise ConfigError(f"model.seq_len={m.seq_len} is longer than the {limit} learned positions of "
                          f"model.config; set model.seq_len to at most {limit}")


# model types with a learned table of absolute positions (transformers 5 dropped position_embedding_type)
_LEARNED_POSITIONS = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "data2vec-text", "electra",
                                "albert", "distilbert", "megatron-bert", "ernie", "roberta-prelayernorm", "xmod",
                                "gpt2", "gpt_neo", "opt", "biogpt", "longformer"})
# model types whose position ids start after the padding index (so max_position_embeddings - pad - 1 usable)
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer",
                                      "roberta-prelayernorm", "xmod"})


def _check_train(cfg: JobConfig) -> None:
    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr, allow_zero=True)
    _positive("train.log_every", t.log_every)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    if t.warmup_steps is not None:
        _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    if not 0 <= t.seed < 2**32:   # every RNG seed pp derives from it must fit torch's 64 bits
        raise ConfigError(f"train.seed={t.seed}: expected an integer from 0 to 2**32 - 1")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio}: expected a number in [0, 1]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)}: expected a number in [0, 1)")
    _check_precision(cfg)
    if t.warmup_steps is not None and t.warmup_steps > t.steps and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"pp.run: note: train.warmup_steps={t.warmup_steps} is more than train.steps={t.steps}: the "
              f"learning rate never reaches train.lr", flush=True)
    check_data(cfg)
    c = cfg.checkpoint
    _positive("checkpoint.every", c.every, allow_zero=True)
    _positive("checkpoint.keep", c.keep, allow_zero=True)
    for name in c.on_signal:
        try:
            signal_number(str(name))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_precision(cfg: JobConfig) -> None:
    """train.precision and train.activation_checkpointing are known values; the deprecated train.dtype
    becomes the precision it means, with a note saying which one to write."""
    from pp.parallel.checkpointing import MODES
    from pp.parallel.precision import PRECISIONS

    t = cfg.train
    if t.dtype is not None:
        if t.dtype not in DTYPES:
            raise ConfigError(f"train.dtype={t.dtype!r}: expected one of {', '.join(DTYPES)} (deprecated: "
                              f"use train.precision)")
        meant = DTYPE_PRECISION[t.dtype]
        if t.precision not in ("fp32", meant):
            raise ConfigError(f"train.dtype={t.dtype!r} disagrees with train.precision={t.precision!r}; "
                              f"drop train.dtype (deprecated)")
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"pp.run: train.dtype is deprecated: write train.precision: {meant} instead of "
                  f"train.dtype: {t.dtype}", flush=True)
        t.precision, t.dtype = meant, None
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if t.activation_checkpointing not in MODES:
        raise ConfigError(f"train.activation_checkpointing={t.activation_checkpointing!r}: expected one of "
                          f"{', '.join(MODES)}")
    if not t.activations_in_bf16 and t.precision != "bf16-mixed" and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"pp.run: note: train.activations_in_bf16=false has no effect with train.precision={t.precision} "
              f"(only bf16-mixed sends activations in bfloat16)", flush=True)


def _check_parallel(cfg: JobConfig, world_size: int) -> Layout:
    p = cfg.parallel
    _positive("parallel.dp", p.dp)
    _positive("parallel.tp", p.tp)
    if p.pp is None and world_size % (p.dp * p.tp):
        raise ConfigError(f"parallel.pp is unset and the world size {world_size} is not a multiple of dp={p.dp} x "
                          f"tp={p.tp}: start a multiple of {p.dp * p.tp} processes or set parallel.pp")
    pp = world_size // (p.dp * p.tp) if p.pp is None else p.pp
    _positive("parallel.pp", pp)
    _positive("parallel.timeout_s", p.timeout_s)
    if p.device not in CHOICES["parallel.device"]:
        raise ConfigError(f"parallel.device={p.device!r}: expected one of {', '.join(CHOICES['parallel.device'])}")
    if p.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device='cuda' but this machine has no CUDA device")
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if p.device != "cpu" and torch.cuda.is_available() and per_machine > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"parallel.device={p.device!r} gives each process one CUDA device, but {per_machine} processes "
                          f"run on this machine, which shows {n}: start at most {n} per machine "
                          f"(torchrun --nproc-per-node {n}), or set parallel.device: cpu")
    if pp * p.dp * p.tp != world_size:
        n = pp * p.dp * p.tp
        raise ConfigError(f"parallel.pp={pp} x dp={p.dp} x tp={p.tp} = {n} rank{'s' * (n != 1)}, but the world "
                          f"size is {world_size}: start {n} process{'es' * (n != 1)} (torchrun --nproc-per-node) "
                          f"or change parallel.pp")
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero={p.zero!r}: expected 0, 1, 2 or 3 (DeepSpeed's ZeRO levels)")
    if p.zero and p.dp == 1 and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"pp.run: parallel.zero={p.zero} with parallel.dp=1 is a no-op: there are no replicas to "
              f"shard over", flush=True)
    return check_schedule(cfg, pp)


def check_schedule(cfg: JobConfig, pp: int) -> Layout:
    """The schedule keys against `pp` pipeline ranks (name, microbatches, stages per rank, CUDA graphs,
    compile): ConfigError for the first bad one, else the layout they give. Prints nothing, so `pp.tune`
    can ask it of every plan it ranks."""
    p, s = cfg.parallel, cfg.schedule
    name = resolve_schedule(s.name)
    _positive("schedule.microbatches", s.microbatches)
    if cfg.train.batch_size % (s.microbatches * p.dp):
        what = f"schedule.microbatches={s.microbatches}" + (f" x parallel.dp={p.dp} = {s.microbatches * p.dp}"
                                                              if p.dp > 1 else "")
        raise ConfigError(f"{what} does not divide train.batch_size={cfg.train.batch_size}"
                          + (" (each data-parallel replica needs whole microbatches)" if p.dp > 1 else ""))
    _check_tp_sizes(cfg)
    from pp.schedules.registry import build_lists, get_spec

    spec = get_spec(name)
    try:
        n_stages = spec.n_stages(pp, s.stages_per_rank)
    except ValueError as e:
        raise ConfigError(f"schedule.stages_per_rank={s.stages_per_rank}: {e}") from None
    if cfg.model.name in ("gpt", "mlp") and n_stages > cfg.model.n_layers + 2:
        raise ConfigError(f"model.n_layers={cfg.model.n_layers} is too few for {n_stages} stages "
                          f"(parallel.pp={pp} x {n_stages // pp} stages per rank)")
    try:
        placement, _ = build_lists(name, pp, s.microbatches, n_stages // pp)
    except ValueError as e:
        raise ConfigError(f"schedule.microbatches={s.microbatches} with parallel.pp={pp}: {e}") from None
    if s.cuda_graphs:
        _check_cuda_graphs(p.tp, p.zero if p.dp > 1 else 0)
    _check_compile(s, cfg.train.activation_checkpointing)
    layout = Layout(name, pp, n_stages // pp, tuple(placement))
    _check_split(cfg, layout)
    return layout


def _check_compile(s: object, checkpointing: str) -> None:
    if s.compile_per is not None and s.compile_per not in CHOICES["schedule.compile_per"]:
        raise ConfigError(f"schedule.compile_per={s.compile_per!r}: expected 'block' or 'stage'")
    if s.compile and s.compile_per == "stage" and checkpointing != "none":
        raise ConfigError(f"schedule.compile_per='stage' with train.activation_checkpointing={checkpointing!r}: "
                          f"the recompute is not traced into a compiled stage; set schedule.compile_per='block'")


def _check_cuda_graphs(tp: int, zero: int) -> None:
    if tp > 1:
        raise ConfigError(f"schedule.cuda_graphs=true with parallel.tp={tp}: stages with tensor-parallel "
                          f"collectives are not captured; set parallel.tp=1 or schedule.cuda_graphs=false")
    if zero == 3:
        raise ConfigError("schedule.cuda_graphs=true with parallel.zero=3: ZeRO 3 frees the whole parameters "
                          "between steps, and a replayed graph reads them where it was captured; set "
                          "parallel.zero to 1 or 2, or schedule.cuda_graphs=false")


def _check_tp_sizes(cfg: JobConfig) -> None:
    """The built-in models' tp plans shard attention heads and MLP widths: tp must divide them."""
    m, tp = cfg.model, cfg.parallel.tp
    if tp == 1 or is_custom_model(m.name) or is_hf_model(m.name):
        return
    sizes = {"model.n_heads": m.n_heads} if m.name == "gpt" else {}
    sizes["model.d_ff" if m.d_ff else "model.d_ff (4 x d_model)"] = m.d_ff or 4 * m.d_model
    for key, value in sizes.items():
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={value}: each tensor-parallel rank "
                              f"needs whole heads and an equal share of the MLP width")


def _check_split(cfg: JobConfig, layout: Layout) -> None:
    sp = cfg.split
    if sp.policy not in CHOICES["split.policy"]:
        raise ConfigError(f"split.policy={sp.policy!r}: expected 'cost' or 'params'")
    if not sp.points:
        return
    if not all(isinstance(p, str) and p for p in sp.points):
        raise ConfigError(f"split.points={sp.points!r}: expected a list of module names such as 'blocks.2'")
    if len(set(sp.points)) != len(sp.points):
        raise ConfigError(f"split.points={sp.points!r} names a module twice")
    if len(sp.points) != layout.n_stages - 1:
        raise ConfigError(f"split.points has {len(sp.points)} entries but {layout.n_stages} stages need "
                          f"{layout.n_stages - 1} (parallel.pp={layout.pp} x {layout.stages_per_rank} per rank)")


def _token_files(source: str) -> bool:
    """Whether train.data names token ids (.bin/.npy files, or a directory or glob of them), not bytes."""
    is_glob = any(c in source for c in "*?[")
    return source.endswith((".bin", ".npy")) or os.path.isdir(source) or (
        is_glob and not source.endswith((".txt", ".jsonl")))


def check_data(cfg: JobConfig) -> None:
    """train.data, train.data_dtype, train.tokenizer and the eval section: files exist and agree with their
    descriptions (`<file>.json`), types fit, the tokenizer's vocabulary fits the model's (and is the one token
    files were prepared with), and enough tokens remain for training and evaluation."""
    from pp.data import DataError, open_stream
    from pp.data.stream import recorded_vocab
    from pp.data.tokenize import check_tokenizer

    t, e = cfg.train, cfg.eval
    if t.data_dtype not in CHOICES["train.data_dtype"]:
        raise ConfigError(f"train.data_dtype={t.data_dtype!r}: expected uint16 or uint32")
    if e.every < 0:
        raise ConfigError(f"eval.every={e.every}: expected 0 (never) or a positive number of steps")
    if e.steps < 1:
        raise ConfigError(f"eval.steps={e.steps}: expected a positive number of batches")
    if not 0 < e.split < 0.5:
        raise ConfigError(f"eval.split={e.split}: expected a share in (0, 0.5)")
    if t.tokenizer is not None:
        from pp.data.tokenize import load_tokenizer

        try:
            vocab = load_tokenizer(t.tokenizer).get_vocab_size()
        except DataError as err:
            raise ConfigError(f"train.tokenizer: {err}") from None
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"train.tokenizer {t.tokenizer!r} has {vocab} tokens, more than model.vocab_size="
                              f"{cfg.model.vocab_size}")
    try:
        for key, source in (("train.data", t.data), ("eval.data", e.data if e.every > 0 else None)):
            recorded = recorded_vocab(source) if source else None
            if recorded is not None and recorded[1] > cfg.model.vocab_size:
                raise ConfigError(f"{key}={source!r} was tokenized with a vocabulary of {recorded[1]} (see "
                                  f"{recorded[0]}.json), more than model.vocab_size={cfg.model.vocab_size}")
            note = check_tokenizer(source, t.tokenizer, key) if source and t.tokenizer is not None else None
            if note and int(os.environ.get("RANK", "0") or 0) == 0:
                print(f"pp.run: note: {note}", flush=True)
        stream = open_stream(t.data, t.data_dtype, t.tokenizer, cfg.model.seq_len)
        if e.every > 0 and e.data is not None:
            open_stream(e.data, t.data_dtype, t.tokenizer, cfg.model.seq_len, key="eval.data")
        elif e.every > 0:
            held = int(len(stream) * e.split)
            if held < cfg.model.seq_len + 1 or len(stream) - held < cfg.model.seq_len + 1:
                raise ConfigError(f"eval.split={e.split} of train.data's {len(stream)} tokens leaves too few "
                                  f"for training or evaluation windows of model.seq_len + 1 = {cfg.model.seq_len + 1}; "
                                  f"set eval.data or a larger eval.split")
    except DataError as err:
        raise ConfigError(str(err)) from None
    if cfg.output.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (only whether it imports)
        except ImportError:
            raise ConfigError("output.tensorboard=true needs the tensorboard package: pip install 'pp[tensorboard]'") from None
    if cfg.output.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("output.wandb=true needs the wandb package: pip install wandb") from None


def check_split_points(points: list[str], model: torch.nn.Module) -> None:
    """Every split point must name a submodule of the built model."""
    names = dict(model.named_modules())
    for p in points:
        if p not in names:
            close = difflib.get_close_matches(p, list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"split.points: the model has no module {p!r}{hint}")


# what pp.run writes in output.dir: (name, whether it is a directory)
_OUTPUT_ENTRIES = (("checkpoints", True), ("tensorboard", True), ("profile", True), ("metrics.jsonl", False),
                   ("summary.json", False), ("trace.json", False), (".pp.lock", False))


def _check_output(cfg: JobConfig) -> None:
    d = cfg.output.dir
    if not d:
        raise ConfigError("output.dir is empty: name a directory for metrics.jsonl and checkpoints")
    if os.path.exists(d) and not os.path.isdir(d):
        raise ConfigError(f"output.dir={d!r} exists and is not a directory")
    for name, want_dir in _OUTPUT_ENTRIES:   # found now, not when the run first writes there
        path = os.path.join(d, name)
        if os.path.exists(path) and os.path.isdir(path) != want_dir:
            raise ConfigError(f"output.dir={d!r} holds {name!r} as a {'file' if want_dir else 'directory'}, where "
                              f"pp.run writes its {'directory' if want_dir else 'file'} of that name; move it away")
    ps = cfg.output.profile_step
    if isinstance(ps, bool) or not isinstance(ps, int) or not 0 <= ps <= cfg.train.steps:
        raise ConfigError(f"output.profile_step={ps!r}: expected 0 (never) or a step number from 1 to "
                          f"train.steps={cfg.train.steps}")
