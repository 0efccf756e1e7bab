"""The recipe schema: the dataclasses a recipe's YAML is validated against (posttrain/config/loader.py).
Imports nothing of posttrain but the range types (posttrain/ranges.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.ranges import (
    LossAggregation, NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt, RunName, Share,
)

Tracker = Literal["none", "tensorboard", "wandb", "trackio"]  # report_to: who gets a copy of the metrics (trackers.py)


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
class TeacherConfig(ModelConfig):
    """An on-policy recipe's teacher: a separate model (path or tiny), or, with source: self, the
    student itself scoring the same response tokens after its prompt re-rendered with privileged
    context (OPSD, arXiv 2601.18734: data/privileged.py). The last three keys are for self only."""

    source: Literal["model", "self"] = "model"
    weights: Literal["current", "frozen"] | None = None  # self: current (π_old at scoring time; default) or frozen (the starting student)
    context_field: str | None = None  # self: the prompt rows' field the teacher also sees (default "solution")
    context_template: str | None = None  # self: the teacher's user turn: "opsd" (default) or a format string with {question} and {context}


@dataclass
class SyntheticConfig:
    """The built-in step-by-step arithmetic task (see posttrain/data/synthetic.py)."""

    split: Literal["pretrain", "pretrain_wide", "in_domain", "out_of_domain", "teacher"] = "in_domain"
    num_examples: PositiveInt = 2000
    seed: int = 1234  # the data seed; the run seed changes init, order and sampling only


@dataclass
class RowsConfig:
    """Where the rows come from and which field holds the prompt: shared by a train recipe's
    `data` (demonstrations) and an on-policy recipe's `prompts`."""

    source: str = "synthetic"  # "synthetic", a .jsonl/.json/.parquet path (or glob), or a Hub id
    split: str = "train"
    prompt_field: str = "problem"
    system_prompt: str | None = None
    max_examples: PositiveInt | None = None  # keep the first N rows
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DataConfig(RowsConfig):
    """Demonstrations: a prompt and the response trained on."""

    response_field: str = "solution"
    # The response may be a list of chat messages (OpenR1-Math-220k's `messages`): the text of its
    # last turn with this role is used.
    response_role: str = "assistant"
    max_length: PositiveInt = 1024  # prompt + response tokens; longer examples are cut at the end
    teacher_cache: str | None = None  # a `posttrain teacher-cache` folder of this data file (objective kd_topk)
    # Conversational data (data/conversation.py): "messages" = response_field holds whole
    # conversations, loss on the response_role turns; "prompt-completion" = TRL's pairs (plain
    # strings, no template; or message lists through the template).
    # "preference" = (chosen, rejected) response pairs of one prompt for dpo (data/preference.py)
    format: Literal["prompt-response", "messages", "prompt-completion", "preference"] = "prompt-response"
    train_turns: Literal["all", "last"] = "all"  # which response_role turns of a conversation are trained
    chosen_field: str = "chosen"  # data.format preference: the preferred response (`posttrain pref-data` writes it)
    rejected_field: str = "rejected"  # data.format preference: the dispreferred response


@dataclass
class ObjectiveConfig:
    """`name` picks an objective from the registry; the other keys are that objective's params
    (validated by the loader against the objective's Params: config/loader.py)."""

    name: str
    params: Any


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
class LoopConfig:
    """What both training loops share (a train recipe's and an on-policy recipe's `train`)."""

    micro_batch_size: PositiveInt = 8  # examples (rollouts) per forward/backward (per process)
    loss_aggregation: LossAggregation = "token-mean"  # per-token losses -> the step's loss (losses/aggregation.py)
    # train only on this top share of highest-entropy tokens per response (offline: under the
    # current weights, a no-grad pre-pass; on-policy: π_old's entropy from the scoring pass)
    entropy_top_ratio: Share | None = None
    # auto: bf16 autocast on CUDA, fp32 on CPU; bf16-pure: bf16 weights, gradients and optimizer state
    precision: Literal["auto", "fp32", "bf16", "bf16-pure"] = "auto"
    parallel: Literal["ddp", "fsdp2"] = "ddp"  # with several processes: replicate (DDP) or shard (FSDP2)
    head_chunk_tokens: PositiveInt | None = None  # tokens per LM-head chunk; None: from a 160 MB buffer budget
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None  # None: full fine-tuning
    save_every: NonNegativeInt = 0  # optimizer steps (on-policy: loop steps) between checkpoints; 0: only the final one
    keep_checkpoints: PositiveInt = 2
    max_nonfinite_steps: PositiveInt = 3  # stop after this many updates in a row skipped for a NaN/inf loss or grad


@dataclass
class TrainLoopConfig(LoopConfig):
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None  # stop early after this many optimizer steps
    batch_size: PositiveInt = 32  # examples per optimizer step, over all processes
    micro_batch_tokens: PositiveInt | None = None  # if set: micro-batches by padded-token budget instead
    token_probs_examples: NonNegativeInt = 0  # training examples scored before/after for token_probs.json; 0: off
    packing: bool = False  # padding-free micro-batches of ≤ micro_batch_tokens (data/packing.py)


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
    # Experiment trackers that get a copy of every metrics row (posttrain/trackers.py); none: []
    report_to: list[Tracker] = field(default_factory=list)


@dataclass
class PromptsConfig(RowsConfig):
    """The prompts the student answers on-policy (the rows' other fields: the gold answer)."""

    # Field cleaning, then the template: "dapo-instructions" drops DAPO-Math-17k's "Answer:"
    # instruction lines (as the LSM authors' data script does); the template is a name in
    # posttrain/data/templates.py (e.g. "lsm-math") or a format string with {question}.
    clean: Literal["none", "dapo-instructions"] = "none"
    template: str | None = None
    dedupe: bool = False  # keep only the first row of each distinct prompt field (DAPO-Math-17k repeats each ~100x)
    max_prompt_length: PositiveInt = 512  # longer prompts are skipped
    answer_field: str = "answer"  # the gold answer, for objectives graded on a verifiable reward (grpo)
    reward: Literal["math", "code"] = "math"  # math: grader vs answer_field; code: the rows' test, entry_point (sandbox)


@dataclass
class VllmConfig:
    gpu_memory_utilization: Share = 0.5
    tensor_parallel_size: PositiveInt = 1


@dataclass
class SamplingConfig:
    """How a model samples: an on-policy recipe's `rollout`, and an eval recipe."""

    temperature: NonNegativeFloat = 1.0  # 0: greedy
    top_p: Share = 1.0
    top_k: NonNegativeInt = 0  # 0: no top-k cut
    max_new_tokens: PositiveInt = 256


@dataclass
class RolloutConfig(SamplingConfig):
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: PositiveInt = 16
    samples_per_prompt: PositiveInt = 8
    # DAPO's dynamic sampling (graded objectives): drop groups whose rewards are all equal and draw
    # more prompts until the step has prompts_per_step groups, at most max_draws batches (rollouts.py)
    dynamic_sampling: bool = False
    max_draws: PositiveInt = 3
    # DAPO's overlong reward shaping (verifiable rewards; rl_shaping.py): a response longer than
    # max_new_tokens − overlong_buffer gets a penalty growing linearly to −overlong_penalty at
    # max_new_tokens, added to its reward before the group advantage. null: off (DAPO: 4096 of 20480)
    overlong_buffer: PositiveInt | None = None
    overlong_penalty: PositiveFloat = 1.0  # the penalty at max_new_tokens (verl's overlong_buffer.penalty_factor)
    # truncated importance sampling (verl, TRL for vLLM rollouts): each token's loss × min(π_old / π_rollout, cap),
    # π_rollout the backend's log-prob of the sampled token. null: off
    importance_cap: PositiveFloat | None = None
    # π_old of the step's updates: "recompute" scores the rollouts with the student before the first
    # update (a forward over every rollout, as TRL and verl do by default); "sampler" takes the
    # log-probs the hf backend recorded while sampling (verl's bypass mode): the same weights and
    # fp32, so they differ from the recomputed ones by rounding only (~1e-7, the rollout_logprob_gap
    # metric of a recompute run), and the forward is saved. hf backend, fp32, plain sampling and no
    # teacher only (rl_checks); no "entropy" metric (that came from the scoring pass).
    old_logprob: Literal["recompute", "sampler"] = "recompute"
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
    allow_weak_sandbox: bool = False  # reward: code without bubblewrap (a weak sandbox: rewards can be forged)


@dataclass
class CriticConfig:
    """The value model of an objective that declares one (ppo: posttrain/critic.py): the student's
    architecture and starting weights with a scalar head, trained on each PPO mini-batch by its own
    AdamW, which is the recipe's `optim` (betas, weight decay, grad clip, schedule) at this lr."""

    lr: PositiveFloat  # required (verl's critic.optim.lr is 1e-5, 10x its actor's 1e-6)
    clip_value: PositiveFloat | None = 0.5  # ε_v of the clipped value loss (verl's cliprange_value); null: unclipped


@dataclass
class RLLoopConfig(LoopConfig):
    steps: PositiveInt = 100
    mini_batch_size: PositiveInt = 64  # rollouts per optimizer step (PPO mini-batch), over all processes
    ppo_epochs: PositiveInt = 1
    mask_first_tokens: list[str] = field(default_factory=list)  # LSM paper's special-token mask


@dataclass
class RLRecipe:
    name: RunName
    student: ModelConfig
    objective: ObjectiveConfig
    teacher: TeacherConfig | None = None  # required exactly when the objective uses a teacher signal (opd, lsm)
    seed: int = 0
    out_dir: str = "runs"
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RLLoopConfig = field(default_factory=RLLoopConfig)
    critic: CriticConfig | None = None  # required exactly when the objective learns a value model (ppo)
    # Experiment trackers that get a copy of every metrics row (posttrain/trackers.py); none: []
    report_to: list[Tracker] = field(default_factory=list)


@dataclass
class EvalRecipe(SamplingConfig):
    """`posttrain eval` (flags or an eval recipe); temperature, top_p, top_k from SamplingConfig."""

    model: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: ["math500"])
    data_dir: str | None = None
    prompt: Literal["chat", "qwen-boxed", "raw", "lsm-think"] = "chat"
    extract: Literal["boxed", "after-think", "harness"] = "boxed"  # math answer extraction + grader: eval/protocols.py
    samples: PositiveInt = 1
    limit: PositiveInt | None = None
    seed: int = 0
    max_new_tokens: PositiveInt = 1024  # longer than a rollout's default: reasoning answers
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: PositiveInt = 32  # prompts per generation call
    workers: PositiveInt = 2  # grading processes
    out: str | None = None
    # Experiment trackers that get a copy of the results (per benchmark) (posttrain/trackers.py); none: []
    report_to: list[Tracker] = field(default_factory=list)
