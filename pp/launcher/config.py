"""The job config: YAML sections as typed dataclasses with defaults and help texts, plus CLI overrides.

`load_config(path, ["--train.steps", "20"])` reads, overrides and type-checks; it raises `ConfigError`
(one line naming the key and the bad value) for anything it cannot read. Checks that need the world
size or the schedule registry live in `launcher/validate.py`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message is one line that names the key and the bad value."""


def _opt(default: Any, help: str) -> Any:
    """A config field with its default and help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = _opt("gpt", "built-in 'gpt' or 'mlp'; 'hf:ClassName' for a transformers model (e.g. "
                            "hf:LlamaForCausalLM, configured by model.config); or 'package.module:ClassName' "
                            "for your own model, whose other keys in this section become its constructor arguments")
    vocab_size: int = _opt(256, "token vocabulary (the byte-level data needs at least 256)")
    d_model: int = _opt(64, "width of the residual stream")
    n_layers: int = _opt(4, "number of transformer blocks (gpt) or residual MLP blocks (mlp)")
    n_heads: int = _opt(4, "attention heads per block; must divide d_model (gpt only)")
    seq_len: int = _opt(64, "tokens per training sequence (and the gpt's context length)")
    d_ff: int = _opt(0, "hidden width of each MLP; 0 means 4 * d_model")
    tie_weights: bool = _opt(False, "share the token embedding with the LM head (gpt only)")
    config: typing.Union[dict, str, None] = _opt(None, "hf models: the architecture's config fields (a mapping) "
                                                       "or a path to a config.json; default: init_from's config.json")
    init_from: typing.Optional[str] = _opt(None, "start from these weights: a Hugging Face model directory, a "
                                                 ".safetensors file, a torch.save state dict or a pp checkpoint "
                                                 "(ignored when the run resumes from its own checkpoint)")
    args: dict = _opt({}, "constructor arguments of a custom model: filled from this section's other keys")


@dataclass
class ParallelConfig:
    pp: typing.Optional[int] = _opt(None, "pipeline-parallel degree (ranks in the pipeline); default: world size / (dp x tp)")
    dp: int = _opt(1, "data-parallel degree: replicas of the pipeline, each training on its share of "
                      "train.batch_size; gradients are averaged over them every step")
    tp: int = _opt(1, "tensor-parallel degree: each stage's attention and MLP linears are sharded over tp "
                      "neighbouring ranks (gpt, mlp, or a custom model with a tp_plan() method)")
    zero: int = _opt(0, "ZeRO level over the dp replicas (DeepSpeed's numbering): 0 replicated, 1 shards "
                        "optimizer state, 2 also gradients, 3 also parameters between steps; a no-op at dp 1")
    timeout_s: float = _opt(300.0, "seconds a collective or point-to-point transfer may wait before the job fails")
    device: str = _opt("auto", "'auto' (cuda when available, else cpu), 'cpu' or 'cuda'")


@dataclass
class ScheduleConfig:
    name: str = _opt("1F1B", "pipeline schedule, e.g. GPipe, 1F1B, Interleaved1F1B, LoopedBFS, "
                             "InterleavedZeroBubble, ZBVZeroBubble, DualPipeV, ZBVHalf, ZBVMin; 'auto' measures "
                             "the model at start and picks schedule, microbatches, stages per rank and split (as "
                             "python -m pp.tune)")
    microbatches: int = _opt(4, "microbatches per step on each data-parallel replica; microbatches x "
                                "parallel.dp must divide train.batch_size (with name auto: left out, auto "
                                "chooses it)")
    stages_per_rank: typing.Optional[int] = _opt(None, "stages each rank holds; default: what the schedule needs "
                                                       "(1, or 2 for interleaved and V-shaped schedules)")
    cuda_graphs: bool = _opt(False, "replay each stage's forward and backward as CUDA graphs from step 2 on: "
                                    "less host time for small, launch-bound stages (GPU only; not with "
                                    "parallel.tp > 1)")
    compile: bool = _opt(False, "run each stage's forward and backward through torch.compile (inductor); "
                                "compiles at the first step, once per input shape; see docs/performance.md")
    compile_per: typing.Optional[str] = _opt(None, "what one compiled region is: 'block' (each transformer block) "
                                                   "or 'stage'; default: stage, block with activation checkpointing")
    memory_budget_gib: typing.Optional[float] = _opt(None, "memory per rank the automatic choice (name: auto, "
                                                           "pp.tune) must fit in; default: the device's free "
                                                           "memory (host memory on cpu) less a margin")


@dataclass
class SplitConfig:
    points: list = _opt([], "module names where a new stage begins, e.g. ['blocks.2', 'blocks.4']; "
                            "empty: split automatically")
    policy: str = _opt("cost", "automatic split: 'cost' (balance estimated FLOPs) or 'params' (balance parameter counts)")


@dataclass
class TrainConfig:
    steps: int = _opt(30, "optimizer steps to train for")
    batch_size: int = _opt(8, "sequences per step over all replicas (each of parallel.dp replicas takes an "
                              "equal share, split into schedule.microbatches)")
    lr: float = _opt(3e-3, "peak learning rate of AdamW")
    seed: int = _opt(0, "seed of the model init, the data order and every step's RNG")
    data: str = _opt("stdlib", "'stdlib' (this Python's standard library sources, as bytes), a text file (bytes, or "
                               "tokens with train.tokenizer), a .jsonl file (field 'text', with train.tokenizer), a "
                               ".bin/.npy file of token ids, or a directory or glob of .bin/.npy shards")
    data_dtype: str = _opt("uint16", "id type of .bin token files: uint16 (nanoGPT's layout) or uint32")
    tokenizer: typing.Optional[str] = _opt(None, "a Hugging Face tokenizer.json: text and .jsonl data are "
                                                 "tokenized with it once and cached next to the data")
    warmup_steps: typing.Optional[int] = _opt(None, "linear warm-up steps; default: steps // 10")
    min_lr_ratio: float = _opt(0.1, "the cosine decay ends at lr * min_lr_ratio")
    grad_clip: float = _opt(1.0, "clip the global gradient norm (over all stages and tp shards) to this; 0 disables")
    weight_decay: float = _opt(0.1, "AdamW weight decay of weight matrices and embeddings (biases and norm weights get none)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    nan_check: bool = _opt(True, "stop with the step and microbatch named when a loss is not finite")
    precision: str = _opt("fp32", "fp32; bf16-mixed (float32 master weights, gradients and AdamW state, "
                                  "bfloat16 compute and activations); or bf16 (everything bfloat16)")
    activations_in_bf16: bool = _opt(True, "bf16-mixed: send activations and their gradients between stages in "
                                           "bfloat16 (half the traffic; rounds the float32 residual stream at "
                                           "each cut); false: as computed (the unsplit autocast model's values)")
    activation_checkpointing: str = _opt("none", "recompute activations in backward: none; selective (keep "
                                                 "matmul and attention outputs); full (keep only each block's input)")
    dtype: typing.Optional[str] = _opt(None, "deprecated: use train.precision (float32 is fp32, bfloat16 is bf16)")
    log_every: int = _opt(1, "print a log line every this many steps (when stdout is not a terminal)")


@dataclass
class EvalConfig:
    every: int = _opt(0, "evaluate on held-out data every this many steps (and after the last step); 0: never")
    steps: int = _opt(10, "batches (of train.batch_size sequences) per evaluation")
    data: typing.Optional[str] = _opt(None, "held-out data, any form train.data takes; default: the last "
                                            "eval.split of the training data, then excluded from training")
    split: float = _opt(0.01, "share of the training data held out for evaluation when eval.data is not set")


@dataclass
class OutputConfig:
    dir: str = _opt("runs/default", "where metrics.jsonl, trace.json and checkpoints/ go")
    trace: bool = _opt(True, "write the measured action timings of the last step to trace.json (Chrome trace)")
    tensorboard: bool = _opt(False, "write TensorBoard scalars to output.dir/tensorboard (rank 0; needs the "
                                    "tensorboard package: pip install 'pp[tensorboard]')")
    wandb: bool = _opt(False, "log the same scalars to Weights & Biases (needs the wandb package; "
                              "WANDB_MODE=offline works without network)")
    profile_step: int = _opt(0, "run this step under torch.profiler and write output.dir/profile/rank<r>.json "
                                "(Chrome trace: host calls, and kernels on a GPU) on every rank; 0: never")


@dataclass
class CheckpointConfig:
    every: int = _opt(0, "save a checkpoint every this many steps (and after the last step); 0: never")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in output.dir/checkpoints "
                               "(always done after a torchrun restart)")
    keep: int = _opt(3, "how many newest checkpoints to keep; 0 keeps all")
    verify: bool = _opt(True, "record sha256 checksums on save and check them before resuming")
    on_signal: list = _opt(["SIGTERM", "SIGUSR1"], "signals on which every rank finishes its step, saves a "
                                                   "checkpoint of it and exits with 128 + the signal's number; [] turns it off")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the model to train"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "how ranks are used"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "the pipeline schedule"})
    split: SplitConfig = field(default_factory=SplitConfig, metadata={"help": "where the model is cut into stages"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimizer, data and loop"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation on held-out data"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "logs and metrics"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "saving and resuming"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore[misc]
# Keys the user never writes: filled by the loader.
_INTERNAL = {("model", "args")}
_GPT_ONLY = {"n_heads", "tie_weights"}
# train.dtype (deprecated) -> the train.precision it means
DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
_HF_KEYS = {"name", "config", "init_from", "seq_len", "vocab_size"}


def is_hf_model(name: str) -> bool:
    return isinstance(name, str) and name.startswith("hf:")


def is_custom_model(name: str) -> bool:
    return ":" in name and not is_hf_model(name)


class _NotingLoader(yaml.SafeLoader):
    """yaml.safe_load's loader that also lists the keys written twice in one mapping (`twice`: (key, line)):
    YAML lets the last one win, as it does here, and pp.run says so instead of staying silent."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.twice: list[tuple[str, int]] = []


def _noting_mapping(loader: _NotingLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor` merges, as safe_load does
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            loader.twice.append((str(key), key_node.start_mark.line + 1))
        seen.add(key)
    return loader.construct_mapping(node, deep)


_NotingLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _noting_mapping)


def _read_yaml(f) -> tuple[Any, list[tuple[str, int]]]:
    loader = _NotingLoader(f)
    try:
        return loader.get_single_data(), loader.twice
    finally:
        loader.dispose()


def load_config(path: str | None, overrides: list[str] | None = None) -> JobConfig:
    """Read `path` (YAML), apply `--section.key value` overrides, and return the typed config."""
    raw: dict = {}
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory: expected a YAML file")
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw, twice = _read_yaml(f)
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}): expected a YAML file") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"config file {path!r} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        if raw is None:   # an empty file, or comments only: say so, a mistyped path to an empty file trains the defaults
            raw = {}
            if int(os.environ.get("RANK", "0") or 0) == 0:
                print(f"pp.run: note: config file {path} holds no settings: every key takes its default", flush=True)
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(raw).__name__}")
        if twice and int(os.environ.get("RANK", "0") or 0) == 0:
            for key, line in twice:
                print(f"pp.run: note: {path} writes {key!r} a second time at line {line}: the later one replaces "
                      f"the earlier (YAML's rule), keys and all", flush=True)
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    cli = parse_overrides(overrides or [])
    for (section, key), text in cli.items():
        _check_section(section)
        sect = raw.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {sect!r}")
        sect[key] = _FromCli(text)
    return _build(raw)


class _FromCli(str):
    """A value typed on the command line: converted by the field's type rather than read as YAML."""


def parse_overrides(args: list[str]) -> dict[tuple[str, str], str]:
    """`['--train.steps', '20', '--model.d_model=128']` -> {('train', 'steps'): '20', ...}."""
    out: dict[tuple[str, str], str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{name} has no value: write --{name} VALUE")
            value = args[i + 1]
            i += 1
        i += 1
        section, dot, key = name.partition(".")
        if not dot or not key or "." in key:
            raise ConfigError(f"override --{name}: expected --section.key, e.g. --train.steps 20")
        out[(section, key)] = value
    return out


def _check_section(section: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}{_suggest(section, SECTIONS)}; "
                          f"sections are {', '.join(SECTIONS)}")


def _suggest(word: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _build(raw: dict) -> JobConfig:
    sections = {}
    for section, values in raw.items():
        _check_section(section)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        sections[section] = values
    cfg = JobConfig()
    for section, values in sections.items():
        cls = SECTIONS[section]
        if section == "model" and is_custom_model(str(values.get("name", ""))):
            setattr(cfg, section, _custom_model(values))
            continue
        if section == "model" and is_hf_model(str(values.get("name", ""))):
            setattr(cfg, section, _hf_model(values))
            continue
        known = {f.name for f in dataclasses.fields(cls) if (section, f.name) not in _INTERNAL} - {"config"}
        if section == "model" and values.get("name") == "mlp":
            known -= _GPT_ONLY
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown key {section}.{key}{_suggest(str(key), known, section + '.')}; "
                                  f"{section} has {', '.join(sorted(known))}")
            kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
        if section == "train":
            _check_dtype_and_precision(kwargs)
        setattr(cfg, section, cls(**kwargs))
    cfg._given = frozenset(f"{section}.{key}" for section, values in sections.items() for key in values)
    return cfg


def is_given(cfg: JobConfig, key: str) -> bool:
    """Whether the config file or the command line wrote `key` ("section.key"), as opposed to its
    default taken (what `schedule.name: auto` chooses itself unless told)."""
    return key in getattr(cfg, "_given", ())


def _check_dtype_and_precision(given: dict) -> None:
    """Both train.dtype (deprecated) and train.precision written, meaning different things: refused here,
    where an explicit `precision: fp32` can still be told from the default."""
    dtype, precision = given.get("dtype"), given.get("precision")
    if dtype is None or precision is None:
        return
    meant = DTYPE_PRECISION.get(dtype)
    if meant is not None and precision != meant:
        raise ConfigError(f"train.dtype={dtype!r} disagrees with train.precision={precision!r}; drop "
                          f"train.dtype (deprecated; it means precision {meant})")


def _cli_yaml(key: str, text: str) -> Any:
    """A command-line value read as YAML (a mapping, a list, a number), or ConfigError naming the key."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--{key} {text!r} is not valid YAML: {getattr(e, 'problem', None) or e}") from None


def _custom_model(values: dict) -> ModelConfig:
    """A user model: every key but `name` is a constructor argument; seq_len/vocab_size also feed the data."""
    hints = typing.get_type_hints(ModelConfig)
    args = {k: (_cli_yaml(f"model.{k}", v) if isinstance(v, _FromCli) else v) for k, v in values.items()
            if k not in ("name", "init_from")}
    init_from = coerce(values["init_from"], hints["init_from"], "model.init_from") if "init_from" in values else None
    cfg = ModelConfig(name=str(values["name"]), args=args, init_from=init_from)
    for key in ("seq_len", "vocab_size"):
        if key in args:
            setattr(cfg, key, coerce(args[key], hints[key], f"model.{key}"))
    return cfg


def _hf_model(values: dict) -> ModelConfig:
    """A transformers model: its config resolved now (mapping, config.json, or init_from's), with
    seq_len / vocab_size read from it unless the section gives them."""
    unknown = sorted(str(k) for k in values if k not in _HF_KEYS)
    if unknown:
        raise ConfigError(f"unknown key model.{unknown[0]}{_suggest(unknown[0], _HF_KEYS, 'model.')}; an hf: "
                          f"model's section has {', '.join(sorted(_HF_KEYS))} (its architecture goes in model.config)")
    hints = typing.get_type_hints(ModelConfig)
    given = {k: (_cli_yaml(f"model.{k}", v) if isinstance(v, _FromCli) and k != "init_from" else v)
             for k, v in values.items()}
    init_from = coerce(given["init_from"], hints["init_from"], "model.init_from") if "init_from" in given else None
    from pp import hf

    try:
        cls = hf.hf_class(str(given["name"]))
        config = hf.hf_config(cls, given.get("config"), init_from)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = ModelConfig(name=str(given["name"]), config=hf.config_dict(config), init_from=init_from)
    sizes = hf.sizes_from_config(config)
    for key in ("seq_len", "vocab_size"):
        if key in given:
            setattr(cfg, key, coerce(given[key], hints[key], f"model.{key}"))
        elif sizes[key] is None:
            raise ConfigError(f"model.{key} is not set and {type(config).__name__} has no "
                              f"{'max_position_embeddings' if key == 'seq_len' else key}: set model.{key}")
        else:
            setattr(cfg, key, sizes[key])
    return cfg


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "a mapping"}
# keys whose value is one of a few words (validate checks them against these; tests check these against
# pp.parallel's PRECISIONS and MODES and pp.stage.compiled's PER): a value of another type is told the words
CHOICES = {"train.precision": ("fp32", "bf16-mixed", "bf16"),
            "train.activation_checkpointing": ("none", "selective", "full"),
            "schedule.compile_per": ("block", "stage"), "split.policy": ("cost", "params"),
            "train.data_dtype": ("uint16", "uint32"), "parallel.device": ("auto", "cpu", "cuda")}


def _expected(key: str, base: type, value: Any) -> str:
    choices = CHOICES.get(key)
    if choices is None:
        return f"{key}: expected {_TYPE_WORDS.get(base, base.__name__)}, got {value!r}"
    hint = " (YAML reads an unquoted yes/no/on/off as true/false)" if isinstance(value, bool) else ""
    return f"{key}={value!r}: expected one of {', '.join(choices)}{hint}"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, list, dict or Optional of one), or ConfigError."""
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if value is None or (isinstance(value, _FromCli) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, inner, key)
    base = typing.get_origin(tp) or tp
    if "none" in CHOICES.get(key, ()) and (value is None or (isinstance(value, _FromCli) and value in ("null", "~"))):
        return "none"   # YAML's null (or ~) for a key whose word for nothing is none
    if isinstance(value, _FromCli):
        value = _from_text(str(value), base)
    ok = _convert(value, base)
    if ok is _BAD:
        raise ConfigError(_expected(key, base, value))
    return ok


_BAD = object()


def _from_text(text: str, base: type) -> Any:
    if base is str:
        return text
    if base is list and not text.lstrip().startswith("["):
        return [p.strip() for p in text.split(",") if p.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _convert(value: Any, base: type) -> Any:
    if base is bool:
        return value if isinstance(value, bool) else _BAD
    if base is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' as a string
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if base is str:
        return value if isinstance(value, str) else _BAD
    if base is list:
        return list(value) if isinstance(value, (list, tuple)) else _BAD
    if base is dict:
        return dict(value) if isinstance(value, dict) else _BAD
    return value if isinstance(value, base) else _BAD


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    return getattr(tp, "__name__", str(tp))


def help_text() -> str:
    """Every section and key with its type, default and help, for `python -m pp.run --help`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (section, f.name) in _INTERNAL:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            tname = _type_name(hints[f.name])
            lines.append(f"  {f.name} ({tname}, default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)
