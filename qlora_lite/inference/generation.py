"""Run prompts or chats through a base model, with or without a trained adapter (greedy by default)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from qlora_lite.data.encoding import ensure_chat_template
from qlora_lite.data.templates import stop_strings
from qlora_lite.hub.push import resolve_adapter
from qlora_lite.inference.decoding import Completion, Prompt, complete, eos_ids, folder_eos_ids
from qlora_lite.model.loading import load_for_inference

__all__ = ["Completion", "Generator", "Prompt", "generate", "generate_batch"]


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
        folder = resolve_adapter(adapter, revision) if adapter is not None else None
        self.model, self.tokenizer = load_for_inference(
            folder, model=model, quantization=quantization, compute_dtype=compute_dtype
        )
        ensure_chat_template(self.tokenizer)
        # The run folder's generation config names the end-of-turn token it learned, when it differs from EOS.
        self.eos = eos_ids(self.model, self.tokenizer, folder_eos_ids(folder))

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
            outputs += [
                c.text
                for c in self.complete(batch_prompts[start : start + batch_size], max_new_tokens, temperature)
            ]
        return outputs[0] if single else outputs

    def complete(
        self, prompts: Sequence[Prompt], max_new_tokens: int = 128, temperature: float = 0.0, **kwargs: Any
    ) -> list[Completion]:
        """One batch as `Completion`s (text, token counts, finish reason)."""
        tokenizers = [self.tokenizer] * len(prompts)
        kwargs.setdefault("stop", stop_strings(self.tokenizer) or None)  # an end-of-turn of several tokens
        return complete(
            self.model, tokenizers, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            eos=self.eos, **kwargs,
        )  # fmt: skip


@torch.no_grad()
def generate_batch(
    model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, temperature: float = 0.0
) -> list[str]:
    """One left-padded batch through `model` (any causal LM, e.g. the one being trained)."""
    completions = complete(
        model, [tokenizer] * len(prompts), prompts, max_new_tokens=max_new_tokens, temperature=temperature,
        eos=eos_ids(model, tokenizer), stop=stop_strings(tokenizer) or None,
    )  # fmt: skip
    return [c.text for c in completions]


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
