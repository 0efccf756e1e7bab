"""Recipe schema, loader and `key=value` overrides.

A recipe is YAML; its schema is the dataclasses below. Loading validates every key against the
schema and coerces values to the declared types (so `lr: 5e-5`, which PyYAML reads as a string,
becomes a float). Any mistake raises `UserError` with one line that names the file, the key and
what is allowed. Overrides on the command line (`optim.lr=1e-4`) are merged into the raw YAML
first, so they are typed and checked by exactly the same code.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from posttrain.errors import UserError

# ----------------------------------------------------------------------------------------------
# Allowed ranges of numeric keys: attached to a type with Annotated, checked by the loader, so a
# zero batch size or a negative learning rate is a one-line error before anything runs.


@dataclass(frozen=True)
class Bounds:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # True: the value must be > low (else >= low)
    high_open: bool = False

    def allows(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


PositiveInt = Annotated[int, Bounds(low=1)]
NonNegativeInt = Annotated[int, Bounds(low=0)]
PositiveFloat = Annotated[float, Bounds(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Bounds(low=0)]
Probability = Annotated[float, Bounds(low=0, high=1)]  # [0, 1]
OpenFraction = Annotated[float, Bounds(low=0, high=1, high_open=True)]  # [0, 1)
Share = Annotated[float, Bounds(low=0, high=1, low_open=True)]  # (0, 1]: top-p, GPU memory share
# How per-token losses become one scalar per optimizer step (see posttrain/losses/aggregation.py).
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "microbatch-token-mean"]


@dataclass(frozen=True)
class RunNameRule:
    """A run's name is a folder under out_dir: not empty, not absolute, no '..' that leaves it."""

    def allows(self, value: str) -> bool:
        parts = Path(value).parts
        return bool(value.strip()) and bool(parts) and not Path(value).is_absolute() and ".." not in parts

    def describe(self) -> str:
        return "that names a folder under out_dir (not empty, not absolute, no '..')"


RunName = Annotated[str, RunNameRule()]

# ----------------------------------------------------------------------------------------------
# Schema


@dataclass
class TinyModelConfig:
    """A randomly initialised small model plus a BPE tokenizer trained on the synthetic task."""

    arch: Literal["qwen2", "llama"] = "qwen2"
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 256
    vocab_size: PositiveInt = 384
    max_position_embeddings: PositiveInt = 512


@dataclass
class ModelConfig:
    path: str | None = None  # HF checkpoint directory or Hub id
    tiny: TinyModelConfig | None = None  # build a tiny model instead of loading `path`
    tokenizer: str | None = None  # defaults to `path`


@dataclass
class SyntheticConfig:
    """The built-in step-by-step arithmetic task (see posttrain/data/synthetic.py)."""

    split: Literal["pretrain", "in_domain", "out_of_domain"] = "in_domain"
    num_examples: PositiveInt = 2000
    seed: int = 1234  # the data seed; the run seed changes init, order and sampling only


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic", a .jsonl/.json/.parquet path (or glob), or a Hub id
    split: str = "train"
    prompt_field: str = "problem"
    response_field: str = "solution"
    system_prompt: str | None = None
    max_examples: PositiveInt | None = None  # keep the first N rows
    # The response may be a list of chat messages (OpenR1-Math-220k's `messages`): the text of its
    # last turn with this role is used.
    response_role: str = "assistant"
    max_length: PositiveInt = 1024  # prompt + response tokens; longer examples are cut at the end
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ObjectiveConfig:
    """`name` picks an objective from the registry; the other keys are that objective's params."""

    name: str
    params: Any

    @classmethod
    def _parse(cls, raw: Any, key: str, where: _Where) -> ObjectiveConfig:
        from posttrain.losses import OBJECTIVES

        if not isinstance(raw, dict):
            where.fail(key, f"must be a mapping with at least 'name' (one of: {', '.join(OBJECTIVES)})")
        name = raw.get("name")
        if name is None:
            where.fail(f"{key}.name", f"is required; allowed: {', '.join(OBJECTIVES)}")
        if name not in OBJECTIVES:
            where.fail(f"{key}.name", f"must be one of: {', '.join(OBJECTIVES)}; got {name!r}")
        rest = {k: v for k, v in raw.items() if k != "name"}
        params = _build(OBJECTIVES[name].Params, rest, key, where)
        return cls(name=name, params=params)


@dataclass
class OptimConfig:
    lr: PositiveFloat = 1e-5
    betas: tuple[OpenFraction, OpenFraction] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: NonNegativeFloat = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: OpenFraction = 0.0
    # false: warmup step s (0-based) uses lr·(s+1)/W; true: lr·s/W, so the first update has lr 0
    # (verl's get_cosine_schedule_with_warmup, the DFT authors' trainer).
    warmup_starts_at_zero: bool = False


@dataclass
class LoraConfig:
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: OpenFraction = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainLoopConfig:
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None  # stop early after this many optimizer steps
    batch_size: PositiveInt = 32  # examples per optimizer step, over all processes
    micro_batch_size: PositiveInt = 8  # examples per forward/backward (per process)
    micro_batch_tokens: PositiveInt | None = None  # if set: micro-batches by padded-token budget instead
    loss_aggregation: LossAggregation = "token-mean"  # per-token losses -> the step's loss (losses/aggregation.py)
    entropy_top_ratio: Share | None = None  # train only on this top share of highest-entropy tokens per response
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16-pure: bf16 weights, gradients and optimizer state
    precision: Literal["auto", "fp32", "bf16", "bf16-pure"] = "auto"
    parallel: Literal["ddp", "fsdp2"] = "ddp"  # with several processes: replicate (DDP) or shard (FSDP2)
    head_chunk_tokens: PositiveInt | None = None  # tokens per LM-head chunk; None: from a 160 MB buffer budget
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None  # None: full fine-tuning
    save_every: NonNegativeInt = 0  # optimizer steps between checkpoints; 0: only the final one
    keep_checkpoints: PositiveInt = 2
    max_nonfinite_steps: PositiveInt = 3  # stop after this many updates in a row skipped for a NaN/inf loss or grad
    token_probs_examples: NonNegativeInt = 0  # training examples scored before/after for token_probs.json; 0: off


@dataclass
class TrainRecipe:
    name: RunName
    model: ModelConfig
    objective: ObjectiveConfig
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


@dataclass
class PromptsConfig:
    source: str = "synthetic"
    split: str = "train"
    prompt_field: str = "problem"
    system_prompt: str | None = None
    # Field cleaning, then the template: "dapo-instructions" drops DAPO-Math-17k's "Answer:"
    # instruction lines (as the LSM authors' data script does); the template is a name in
    # posttrain/data/templates.py (e.g. "lsm-math") or a format string with {question}.
    clean: Literal["none", "dapo-instructions"] = "none"
    template: str | None = None
    dedupe: bool = False  # keep only the first row of each distinct prompt field (DAPO-Math-17k repeats each ~100x)
    max_examples: PositiveInt | None = None
    max_prompt_length: PositiveInt = 512  # longer prompts are skipped
    answer_field: str = "answer"  # the gold answer, for objectives graded on a verifiable reward (grpo)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class VllmConfig:
    gpu_memory_utilization: Share = 0.5
    tensor_parallel_size: PositiveInt = 1


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: PositiveInt = 16
    samples_per_prompt: PositiveInt = 8
    temperature: NonNegativeFloat = 1.0  # 0: greedy
    top_p: Share = 1.0
    top_k: NonNegativeInt = 0  # 0: no top-k cut
    max_new_tokens: PositiveInt = 256
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class ScoringConfig:
    """How the teacher (and the student's π_old) score rollout tokens."""

    backend: Literal["hf", "vllm"] = "hf"  # hf: local transformers, no grad; vllm: prompt_logprobs=K
    chunk_tokens: PositiveInt = 1024  # positions per scoring chunk: only [chunk, V] logits exist at once
    diagnostics_k: PositiveInt = 32  # top-K for the support/overlap metrics when the objective has no k
    # true: π_old, the teacher and the trained π_θ all use logits / rollout.temperature (verl's
    # compute_log_prob and update_policy do); false: temperature 1.
    at_rollout_temperature: bool = False
    gpu_memory_utilization: Share = 0.3  # vllm teacher only
    grader_workers: PositiveInt = 2  # grading processes for a verifiable reward (grpo)


@dataclass
class DistillLoopConfig:
    steps: PositiveInt = 100
    mini_batch_size: PositiveInt = 64  # rollouts per optimizer step (PPO mini-batch), over all processes
    ppo_epochs: PositiveInt = 1
    micro_batch_size: PositiveInt = 8
    loss_aggregation: LossAggregation = "token-mean"  # per-token losses -> the mini-batch's loss
    entropy_top_ratio: Share | None = None  # train only on this top share of π_old's highest-entropy tokens per rollout
    precision: Literal["auto", "fp32", "bf16", "bf16-pure"] = "auto"
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    head_chunk_tokens: PositiveInt | None = None
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    mask_first_tokens: list[str] = field(default_factory=list)  # LSM paper's special-token mask
    save_every: NonNegativeInt = 0
    keep_checkpoints: PositiveInt = 2
    max_nonfinite_steps: PositiveInt = 3  # stop after this many updates in a row skipped for a NaN/inf loss or grad


@dataclass
class DistillRecipe:
    name: RunName
    student: ModelConfig
    objective: ObjectiveConfig
    teacher: ModelConfig | None = None  # required exactly when the objective uses a teacher signal (opd, lsm)
    seed: int = 0
    out_dir: str = "runs"
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: DistillLoopConfig = field(default_factory=DistillLoopConfig)


@dataclass
class EvalRecipe:
    model: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: ["math500"])
    data_dir: str | None = None
    prompt: Literal["chat", "qwen-boxed", "raw", "lsm-think"] = "chat"
    extract: Literal["boxed", "after-think", "harness"] = "boxed"  # math answer extraction + grader: eval/protocols.py
    samples: PositiveInt = 1
    limit: PositiveInt | None = None
    seed: int = 0
    temperature: NonNegativeFloat = 1.0  # 0: greedy
    top_p: Share = 1.0
    top_k: NonNegativeInt = 0
    max_new_tokens: PositiveInt = 1024
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: PositiveInt = 32  # prompts per generation call
    workers: PositiveInt = 2  # grading processes
    out: str | None = None


# ----------------------------------------------------------------------------------------------
# Loader


@dataclass
class _Where:
    """Where values came from, so every error can name the file and the override or flag."""

    file: str
    given: dict[str, str] = field(default_factory=dict)  # key -> how the user wrote it, e.g. "--limit 0"

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        origin = self.file
        if key in self.given:
            origin += f" ({self.given[key]})"
        raise UserError(f"{origin}: key '{key}' {problem}")


def load_recipe(path: str | Path, schema: type, overrides: list[str] | None = None) -> Any:
    """Read a YAML recipe, merge `key=value` overrides, validate against `schema`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    raw = parse_yaml(read_utf8(path), str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the recipe must be a YAML mapping of keys to values")
    where = _Where(str(path))
    for item in overrides or []:
        _apply_override(raw, item, where)
    return _build(schema, raw, "", where)


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a recipe with `lr` twice is a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def parse_yaml(text: str, label: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{label}: malformed YAML{at}: {problem}") from None


def from_dict(schema: type, raw: dict, label: str, given: dict[str, str] | None = None) -> Any:
    """Validate an in-memory mapping (e.g. CLI flags merged over a recipe); `given` says how the
    user wrote a key (e.g. "--limit 0") for the error message."""
    return _build(schema, raw, "", _Where(label, given or {}))


def to_dict(obj: Any) -> Any:
    """A recipe object back to plain YAML-able data (objective params flattened next to name)."""
    if isinstance(obj, ObjectiveConfig):
        return {"name": obj.name, **to_dict(obj.params)}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _apply_override(raw: dict, item: str, where: _Where) -> None:
    if "=" not in item:
        raise UserError(f"{where.file}: override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    where.given[key] = f"override {key}={text}"
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where.fail(".".join(parts[: i + 1]), "is not a section, so it has no sub-keys")
        node = child
    node[parts[-1]] = value


def _build(schema: type, raw: Any, prefix: str, where: _Where) -> Any:
    if hasattr(schema, "_parse"):
        return schema._parse(raw, prefix, where)
    if not isinstance(raw, dict):
        where.fail(prefix or "(top level)", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(schema, include_extras=True)
    known = [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            where.fail(full, f"is unknown{hint}; allowed here: {', '.join(known)}")
    values = {}
    for f in dataclasses.fields(schema):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], full, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            where.fail(full, f"is required ({_describe(hints[f.name])})")
    return schema(**values)


def _coerce(value: Any, hint: Any, key: str, where: _Where) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, where)
    if hint is Any:
        return value
    if origin is Annotated:
        value = _coerce(value, args[0], key, where)
        for bounds in hint.__metadata__:
            if not bounds.allows(value):
                where.fail(key, f"must be {_describe(hint)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key, where)
    if origin is Literal:
        if value not in args:
            where.fail(key, f"must be one of: {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            where.fail(key, f"must be {_describe(hint)}, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                where.fail(key, f"must be {_describe(hint)}, got {value!r}")
            return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
        return [_coerce(v, args[0], key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        where.fail(key, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        where.fail(key, f"must be an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            where.fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(number):  # nan/inf would train (or sample) silently at NaN
            where.fail(key, f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        where.fail(key, f"must be a string, got {value!r}")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            where.fail(key, f"must be a mapping, got {value!r}")
        return value
    raise TypeError(f"schema type {hint!r} for {key} is not supported by the loader")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Annotated:
        return " ".join([_describe(args[0])] + [bounds.describe() for bounds in hint.__metadata__])
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin is list:
        return f"a list, each item {_describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} items, each {_describe(args[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))
