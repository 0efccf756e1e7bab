"""Model preparation for scale: activation checkpointing and LoRA (peft)."""

from __future__ import annotations

from pathlib import Path



def prepare_model(model, loop_cfg, checkpoint: Path | None):
    """Apply the recipe's activation checkpointing and LoRA; with LoRA and a checkpoint, the
    adapter saved in that checkpoint is loaded (trainable) onto the freshly loaded base."""
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
    return get_peft_model(model, config)


def place_teacher(teacher, runtime):
    """Put the (frozen) teacher where it scores: on this process's device."""
    return teacher.to(runtime.device)
