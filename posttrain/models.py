"""Load policies, teachers and tokenizers; build tiny models from a config.

Tiny models go through exactly the path a real checkpoint does: they are built from a
Qwen2/Llama config, saved with `save_pretrained` when a run checkpoints, and loaded back with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from posttrain.config import ModelConfig, TinyModelConfig
from posttrain.errors import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (digits split one by one) trained on the synthetic task's
    fixed corpus, with a ChatML template. Deterministic: same vocab_size, same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.data.synthetic import tokenizer_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def as_reloaded(tokenizer, model_config):
    """The tokenizer exactly as transformers will load it back from a checkpoint with this model
    config. AutoTokenizer picks the tokenizer class from the model type (Qwen2 → Qwen2Tokenizer,
    which rebuilds its own pre-tokenizer and ignores the saved one), so a tokenizer trained with
    another pre-tokenizer would give different ids after save/load. Training with the reloaded
    one from the start makes what posttrain saves reload to the tokenizer it trained with."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="posttrain-tokenizer-") as folder:
        model_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded.pad_token_id is None:
        reloaded.pad_token = reloaded.eos_token
    return reloaded


def build_tiny_model(cfg: TinyModelConfig, vocab_size: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    _quiet_transformers()
    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    config = Qwen2Config(**common) if cfg.arch == "qwen2" else LlamaConfig(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", what: str | None = None,
               key: str | None = None):
    """The model at `path` (a checkpoint folder or Hub id); a folder whose weight files cannot be
    read (truncated, not safetensors, another model's shapes) is one line naming them and the
    recipe `key` or the flag `what` that gave the path."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        weights = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".safetensors", ".bin")) \
            if Path(path).is_dir() else []
        files = f" (weights {', '.join(weights)})" if weights else ""
        raise _path_error(what, key, f"cannot load a model from {path!r}{files}: {type(err).__name__}: {lines[0]}; it "
                          "must be a checkpoint folder that AutoModelForCausalLM.from_pretrained reads (config.json "
                          "and complete weight files)") from None
    check_head_supported(model, path)
    return model.to(device)


def load_policy(cfg: ModelConfig, key: str, seed: int, device, dtype=torch.float32):
    """(model, tokenizer) for a recipe's `model`/`student`/`teacher` section."""
    if (cfg.path is None) == (cfg.tiny is None):
        raise UserError(f": set exactly one of '{key}.path' or '{key}.tiny'", key=key)
    if cfg.tiny is not None:
        tokenizer = build_tiny_tokenizer(cfg.tiny.vocab_size)
        model = build_tiny_model(cfg.tiny, len(tokenizer), seed).to(device=device, dtype=dtype)
        return model, as_reloaded(tokenizer, model.config)
    check_model_path(cfg.path, key=f"{key}.path")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.path)
    return load_model(cfg.path, dtype, device, key=f"{key}.path"), tokenizer


def max_positions(cfg: ModelConfig) -> int | None:
    """max_position_embeddings of a recipe's model section, read without loading the weights
    (the tiny config, or the checkpoint's config.json); None when unknown (a Hub id)."""
    import json

    if cfg.tiny is not None:
        return cfg.tiny.max_position_embeddings
    if cfg.path is None:  # a self-teacher (teacher.source: self) has neither: no config.json in the cwd
        return None
    config = Path(cfg.path) / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_rollout_fits(recipe, longest_prompt: int = 1) -> None:
    """A rollout (prompt + rollout.max_new_tokens) must fit the positions of every model that
    reads it (student, teacher): past max_position_embeddings a model runs on
    positions it never learned, silently. `longest_prompt`: the longest prompt in use (1 before
    the prompts are tokenized: even the shortest prompt must leave room)."""
    new_tokens = recipe.rollout.max_new_tokens
    for key in ("student", "teacher"):
        section = getattr(recipe, key, None)
        positions = max_positions(section) if isinstance(section, ModelConfig) else None
        if positions is not None and longest_prompt + new_tokens > positions:
            prompt = "a prompt" if longest_prompt == 1 else f"the longest prompt ({longest_prompt} tokens)"
            raise UserError(f"({new_tokens}): {prompt} plus the new tokens must fit the {key}'s {positions} positions "
                            f"(max_position_embeddings); allowed: at most {positions - longest_prompt}",
                            key="rollout.max_new_tokens")


def _path_error(what: str | None, key: str | None, problem: str) -> UserError:
    """A problem with a model path given by the recipe `key`, or by the flag `what`."""
    if key is not None:
        return UserError(f": {problem}", key=key)
    return UserError(f"{what + ': ' if what else ''}{problem}")


def check_model_path(path: str, what: str | None = None, *, key: str | None = None) -> None:
    """One clear line for a model that is not there, before transformers retries it as a Hub id:
    about the recipe `key`, or `what` (a flag). A missing path counts as local when offline or
    when no Hub id could look like it (absolute, ./ or ../, or more than one '/')."""
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
    if not Path(path).exists() and (looks_local or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise _path_error(what, key, f"{path!r} does not exist (a local checkpoint directory or, when online, "
                                     "a Hub id like Qwen/Qwen2.5-Math-1.5B)")
    local = Path(path)
    ggufs = [local] if local.suffix == ".gguf" else sorted(local.glob("*.gguf")) if local.is_dir() else []
    if ggufs and not (local.is_dir() and (local / "config.json").is_file()):
        # transformers can read a GGUF file, but the model it returns (still marked as quantised)
        # cannot be saved as a checkpoint: a run could not write one. Convert once instead.
        raise _path_error(what, key, f"{path!r} is a GGUF file{'' if local.suffix == '.gguf' else ' folder'}; posttrain "
                          f"loads Hugging Face checkpoint folders: convert it once (tools/real_model.py shows how: "
                          f"from_pretrained(folder, gguf_file=...), rebuilt from its config, save_pretrained)")


def check_head_supported(model, where: str) -> None:
    """The chunked head computes logits = h · Wᵀ; refuse models whose head does more."""
    config = model.config
    # Gemma 2's softcap, Cohere's logit_scale, Granite's logits_scaling (logits ÷ it), Falcon-H1's
    # lm_head_multiplier (logits × it): each changes the logits after h · Wᵀ
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise UserError(f"{where}: models with {attr} are not supported by the chunked LM head")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError(f"{where}: an LM head with a bias is not supported by the chunked LM head")


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Parameter]:
    """(the transformer body that returns final hidden states, the LM head weight [V, H])."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return base.get_decoder(), base.get_output_embeddings().weight


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def save_model(model, tokenizer, directory: Path) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
