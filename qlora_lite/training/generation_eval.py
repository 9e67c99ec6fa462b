"""Generation checks at the end of a causal-LM run: held-out prompts answered before (adapter off) and after
training, exact/contains match against the expected answers, and a few samples side by side."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from qlora_lite.inference.generation import generate_batch
from qlora_lite.training.evaluation import contains_match, exact_match, side_by_side

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 256


def held_out_pairs(conversations: Sequence[list[dict]]) -> list[tuple[list[dict], str]]:
    """(prompt messages, expected answer): everything before the last assistant turn, and that turn."""
    pairs = []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None and last > 0:
            pairs.append((list(messages[:last]), messages[last]["content"]))
    return pairs


def _answers(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out += generate_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens)
    return out


def before_after(
    model, tokenizer, conversations: Sequence[list[dict]], n: int, n_samples: int
) -> dict[str, Any] | None:
    """Answer `n` held-out prompts with the adapter off (the base) and on; None when there is nothing to ask."""
    pairs = held_out_pairs(conversations)[: max(n, n_samples)]
    if not pairs:
        return None
    prompts = [p for p, _ in pairs]
    expected = [e for _, e in pairs]
    longest = max(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected)
    max_new_tokens = min(MAX_NEW_TOKENS, longest + 16)
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    try:
        with torch.no_grad():
            with model.disable_adapter():
                before = _answers(model, tokenizer, prompts, max_new_tokens)
            after = _answers(model, tokenizer, prompts, max_new_tokens)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    result: dict[str, Any] = {"examples": len(pairs), "max_new_tokens": max_new_tokens}
    if n:
        scored = slice(0, min(n, len(pairs)))
        result["before"] = {
            "exact_match": exact_match(before[scored], expected[scored]),
            "contains_match": contains_match(before[scored], expected[scored]),
        }
        result["after"] = {
            "exact_match": exact_match(after[scored], expected[scored]),
            "contains_match": contains_match(after[scored], expected[scored]),
        }
    shown = slice(0, min(n_samples, len(pairs)))
    texts = [p[-1]["content"] for p in prompts[shown]]
    result["samples"] = [
        {"prompt": t, "expected": e, "before": b, "after": a}
        for t, e, b, a in zip(texts, expected[shown], before[shown], after[shown], strict=True)
    ]
    if result["samples"]:
        log.info(
            "sample generations (adapter off / on):\n%s",
            side_by_side(texts, before[shown], after[shown], expected[shown]),
        )
    return result
