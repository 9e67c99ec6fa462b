"""Adapters for tests: plain PEFT LoRA folders with random (non-zero) weights on the tiny models, no training."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base: str, folder: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj"), **lora) -> str:
    """Save a LoRA adapter whose B matrices are random, so it visibly changes the base's output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora,
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's non-default init is small: make the adapters' effect plain to see
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    peft.save_pretrained(folder)
    return str(folder)
