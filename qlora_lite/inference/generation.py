"""Run prompts or chats through a base model, with or without a trained adapter (greedy by default)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from qlora_lite.data.encoding import ensure_chat_template, prompt_ids
from qlora_lite.data.templates import stop_strings, stop_token_ids
from qlora_lite.model.loading import load_for_inference

Prompt = str | Sequence[dict[str, str]]  # a plain prompt, or a chat as [{"role": ..., "content": ...}, ...]


class Generator:
    """Holds base (+ adapter) in memory so many prompts cost one load."""

    def __init__(
        self,
        adapter: str | os.PathLike | None = None,
        *,
        model: str | None = None,
        quantization: str | None = None,
        compute_dtype: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.model, self.tokenizer = load_for_inference(
            adapter, model=model, quantization=quantization, compute_dtype=compute_dtype, revision=revision
        )
        ensure_chat_template(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 8,
        seed: int | None = 0,
    ) -> str | list[str]:
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], dict))
        batch_prompts: list[Prompt] = [prompts] if single else list(prompts)
        if seed is not None:
            torch.manual_seed(seed)
        outputs: list[str] = []
        for start in range(0, len(batch_prompts), batch_size):
            outputs += self._generate_batch(
                batch_prompts[start : start + batch_size], max_new_tokens, temperature
            )
        return outputs[0] if single else outputs

    def _generate_batch(
        self, prompts: Sequence[Prompt], max_new_tokens: int, temperature: float
    ) -> list[str]:
        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens, temperature)


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, temperature: float = 0.0
) -> list[str]:
    """One left-padded batch through `model` (any causal LM, e.g. the one being trained)."""
    encoded = [prompt_ids(p, tokenizer) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    # Left padding: every prompt ends at the same column, so new tokens line up.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor(
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
    )
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        # The model's EOS and the template's end-of-turn: a model that learned `<|im_end|>` but whose EOS is
        # `<|endoftext|>` (Qwen2.5 base, any model on the ChatML fallback) stops after its answer.
        eos_token_id=stop_token_ids(tokenizer, getattr(model, "generation_config", None)),
        **kwargs,
    )
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    for marker in stop_strings(tokenizer):  # an end-of-turn learned as several tokens: cut there
        texts = [text.split(marker, 1)[0] for text in texts]
    return [text.strip() for text in texts]


def generate(
    prompt: Prompt | Sequence[Prompt],
    *,
    adapter: str | os.PathLike | None = None,
    model: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    **load_kwargs: Any,
) -> str | list[str]:
    """One-shot generation: `generate("Hi", adapter="runs/demo")` or `generate(chat, model="path")`."""
    return Generator(adapter, model=model, **load_kwargs)(
        prompt, max_new_tokens=max_new_tokens, temperature=temperature
    )
