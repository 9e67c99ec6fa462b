"""One code path from prompts to completions: prompt building, left-padded batching, stopping, decoding.

`Generator` (one adapter) and `AdapterSet` (many adapters, one row each) both call `complete()`, so greedy
output through either is the same token for token. Streaming goes through the same function with a callback
that sees each new token; `TextStream` turns those tokens into text pieces whose join is the final text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria

from qlora_lite.data.encoding import prompt_ids

Prompt = str | Sequence[dict[str, str]]  # a plain prompt, or a chat as [{"role": ..., "content": ...}, ...]
GENERATION_CONFIG = (
    "generation_config.json"  # transformers' name; a run folder may hold one (its stop tokens)
)


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text (stop strings and end tokens removed) and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) | "length" (max_new_tokens reached)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def folder_eos_ids(folder: str | os.PathLike | None) -> list[int]:
    """The end tokens a run folder's generation_config.json names (its learned end-of-turn), if any."""
    if folder is None:
        return []
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return []
    return _as_list(json.loads(path.read_text()).get("eos_token_id"))


def eos_ids(model: Any, tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """The model's generation-config end tokens (the tokenizer's EOS if none), the template's end-of-turn, and
    `extra` (a run folder's)."""
    from qlora_lite.data.templates import stop_token_ids

    # The config's EOS (else the tokenizer's) plus the chat template's end-of-turn: a model that learned
    # `<|im_end|>` but whose EOS is `<|endoftext|>` (Qwen2.5 base, the ChatML fallback) stops after its answer.
    ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    return list(dict.fromkeys([*ids, *extra]))


class _StopStrings(StoppingCriteria):
    """Per-row stopping once a stop string appears in the row's new text (a transformers StoppingCriteria)."""

    def __init__(self, tokenizers: Sequence[Any], stop: Sequence[str], width: int) -> None:
        self.tokenizers, self.stop, self.width = tokenizers, list(stop), width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = [
            any(s in tok.decode(row[self.width :], skip_special_tokens=True) for s in self.stop)
            for tok, row in zip(self.tokenizers, input_ids, strict=True)
        ]
        return torch.tensor(done, device=input_ids.device)


class _TokenCallback:
    """A transformers streamer that hands each step's new token ids (one row) to a callback."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token, self.first = on_token, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() first hands over the prompt
            self.first = False
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


def cut(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    positions = [text.find(s) for s in stop or () if s and s in text]
    return (text[: min(positions)], True) if positions else (text, False)


def finish_row(tokenizer: Any, new_ids: Sequence[int], eos: set[int], stop: Sequence[str] | None) -> tuple:
    """(text, completion token count, finish reason) of one row's generated ids."""
    ids = list(new_ids)
    ended = next((i for i, t in enumerate(ids) if t in eos), None)
    kept = ids if ended is None else ids[:ended]
    text, stopped = cut(tokenizer.decode(kept, skip_special_tokens=True), stop)
    count = len(ids) if ended is None else ended + 1
    if stopped and ended is None:
        # Tokens generated after the stop string in the same step (or other rows' steps) are not the row's.
        count = _tokens_until(tokenizer, kept, stop)
    reason = "stop" if ended is not None or stopped else "length"
    return text.strip(), count, reason


def _tokens_until(tokenizer: Any, ids: list[int], stop: Sequence[str] | None) -> int:
    for n in range(1, len(ids) + 1):
        if cut(tokenizer.decode(ids[:n], skip_special_tokens=True), stop)[1]:
            return n
    return len(ids)


@torch.no_grad()
def complete(
    model: Any,
    tokenizers: Sequence[Any],
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    eos: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
    **generate_kwargs: Any,
) -> list[Completion]:
    """One left-padded batch through `model.generate`; row i is built and decoded with `tokenizers[i]`.

    `eos`: the end tokens (any of them ends a row); `generate_kwargs` go to generate (e.g. adapter_names)."""
    encoded = [prompt_ids(p, tok) for p, tok in zip(prompts, tokenizers, strict=True)]
    width = max(len(ids) for ids in encoded)
    pad = tokenizers[0].pad_token_id
    device = next(model.parameters()).device
    # Left padding: every prompt ends at the same column, so new tokens line up.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor(
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
    )
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, **generate_kwargs}
    if temperature > 0:  # greedy decoding gets no sampling knobs (transformers warns about unused ones)
        kwargs.update(temperature=temperature, top_p=top_p)
    if eos:
        kwargs["eos_token_id"] = list(eos)
    if stop:
        kwargs["stopping_criteria"] = [_StopStrings(tokenizers, stop, width)]
    if on_token is not None:
        kwargs["streamer"] = _TokenCallback(on_token)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        **kwargs,
    )
    end = set(eos) if eos else {tokenizers[0].eos_token_id}
    completions = []
    for tok, ids, row in zip(tokenizers, encoded, out, strict=True):
        text, count, reason = finish_row(tok, row[width:].tolist(), end, stop)
        completions.append(Completion(text, len(ids), count, reason))
    return completions


class TextStream:
    """Turns one row's tokens into text pieces: only text that cannot change any more is given out.

    Held back until later tokens settle it: a partial UTF-8 character, trailing whitespace (the final text is
    stripped), and a tail that could be the start of a stop string."""

    def __init__(self, tokenizer: Any, eos: Sequence[int], stop: Sequence[str] | None) -> None:
        self.tokenizer, self.eos, self.stop = tokenizer, set(eos), list(stop or ())
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def push(self, token: int) -> str:
        """The new piece of text after `token` ("" when nothing is settled yet)."""
        if self.ended or token in self.eos:
            self.ended = True
            return ""
        self.ids.append(token)
        text, stopped = cut(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)
        if stopped:
            self.ended = True
            return ""
        text = text.lstrip()
        while text.endswith("\ufffd"):
            text = text[:-1]
        text = text.rstrip()
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    text = text[:-k]
                    break
        return self._advance(text)

    def finish(self, final_text: str) -> str:
        """What is left to send so that the pieces join to `final_text`."""
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
