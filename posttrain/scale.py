"""Model preparation for scale: activation checkpointing, LoRA (peft), teacher placement."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch



def prepare_model(model, loop_cfg, checkpoint: Path | None, seed: int):
    """Apply the recipe's activation checkpointing and LoRA; with LoRA and a checkpoint, the
    adapter saved in that checkpoint is loaded (trainable) onto the freshly loaded base. A new
    adapter's random init comes from the run seed, so a run is reproducible."""
    if loop_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if loop_cfg.lora is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    lora = loop_cfg.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def wrap_for_training(policy, optim_cfg, runtime):
    """(policy, optimizer) for the run's processes, from a PolicyLoss: one process as is; several
    replicate it with DDP (accelerate), or, with train.parallel: fsdp2, shard it with torch's
    FSDP2. The optimizer is built after sharding, on the sharded parameters."""
    from posttrain.optim import build_optimizer

    model = policy.model
    if runtime.sharded:
        shard_fsdp2(policy, blocks_of(model), runtime)
        return policy, build_optimizer(model, optim_cfg)
    return runtime.accelerator.prepare(policy, build_optimizer(model, optim_cfg))


def blocks_of(model) -> set[str]:
    """Class names of the transformer blocks (one FSDP unit each)."""
    return set(getattr(model, "_no_split_modules", None) or [])


def shard_fsdp2(root, blocks: set[str], runtime) -> None:
    """FSDP2 in place: each transformer block its own unit, everything else (embeddings, final
    norm, LM head) in the root's unit. Under bf16, parameters are gathered in bf16 and gradients
    reduced in fp32; the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if runtime.matmul_dtype else MixedPrecisionPolicy()
    for module in root.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mp)
    fully_shard(root, mp_policy=mp)


def place_teacher(teacher, runtime):
    """Put the frozen teacher on this process's device; with several processes, shard it with
    FSDP2 (one unit per transformer block plus the root), so its memory is split across ranks
    instead of copied to each, whether the student itself runs under DDP or FSDP."""
    teacher = teacher.to(runtime.device)
    if runtime.world_size > 1:
        shard_fsdp2(teacher, blocks_of(teacher), runtime)
    return teacher


@contextmanager
def gathered(module):
    """The root parameters of an FSDP2 module (embeddings, final norm, LM head) unsharded for
    code that uses them outside the module's own forward (scoring); a no-op otherwise.
    Sharded blocks still gather themselves in their forward."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    # Make this module FSDP's root before any block runs on its own; otherwise the first block
    # called directly would make itself a root and the module's next forward would fail.
    # (FSDP2 has no public call for this; _lazy_init is idempotent.)
    module._get_fsdp_state()._lazy_init()
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def save_merged_lora(run_dir: Path, model, tokenizer, runtime) -> Path:
    """Write runs/<name>/merged: the base model with every LoRA update W + (α/r)·B·A merged in,
    as a plain HF checkpoint (no peft needed to load or evaluate it). All ranks call this."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = run_dir / "merged"
    if runtime.is_main:
        merged = merge_lora_state(full, lora_scaling(model))
        base = model.get_base_model()
        if base.config.tie_word_embeddings:
            merged.pop("lm_head.weight", None)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().clone() for k, v in merged.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        base.config.save_pretrained(out)
        base.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    runtime.barrier()
    return out


def inference_state_dict(model) -> dict:
    """The model's weights as a plain HF model names them, full on every rank: FSDP2 shards are
    gathered and LoRA updates merged (what an inference engine such as vLLM loads)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = dict(model.state_dict())
    if hasattr(model, "peft_config"):
        state = merge_lora_state(state, lora_scaling(model))
    return {name: tensor.detach() for name, tensor in state.items()}


def lora_scaling(model) -> float:
    """peft's scaling of a LoRA update: α/r, or α/√r with rsLoRA."""
    config = model.peft_config["default"]
    return config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)


def merge_lora_state(state: dict, scaling: float) -> dict:
    """peft's full state dict → the plain model's: W ← W + scaling · B @ A, LoRA tensors dropped."""
    prefix = "base_model.model."
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            module = key[: -len(".base_layer.weight")]
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        name = key[len(prefix):] if key.startswith(prefix) else key
        merged[name.replace(".base_layer.", ".")] = value
    return merged
