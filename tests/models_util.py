"""Tiny decoder models built in-process from a config (no network), saved next to the tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers_util import build_tiny_tokenizer

ARCHITECTURES = ("llama", "qwen2")


def _config(arch: str, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(arch)


def build_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny `arch` model and the tiny tokenizer into `folder`."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = _config(arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(folder: Path, rows: list[dict], name: str = "train.jsonl") -> str:
    """`rows` as a JSON-lines data file in `folder`; its path as a string (what train() takes)."""
    import json

    path = Path(folder) / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
