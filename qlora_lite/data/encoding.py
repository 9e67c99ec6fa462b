"""Chat template, tokenization and loss masks.

Loss masks come from the template itself: for each assistant turn i we render ``messages[:i]`` with the
generation prompt and ``messages[:i+1]``; the text between the two is that turn (content plus the end-of-turn
token). Both renders must be prefixes of the whole conversation (the template is "prefix-stable"); the
character spans are then mapped onto the tokens of the whole conversation with the tokenizer's offsets, so
the tokens are exactly those the model sees at inference time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qlora_lite.data.templates import CHATML, apply_chat_template_choice
from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")

DEFAULT_CHAT_TEMPLATE = CHATML  # used when the tokenizer has none


@dataclass(frozen=True)
class Example:
    """One tokenized training example; `labels` is IGNORE_INDEX (-100) where there is no loss."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class EncodeStats:
    """What happened while encoding a data set (the planner reads `lengths`)."""

    n_examples: int
    n_truncated: int
    n_dropped: int
    lengths: list[int]
    supervised_tokens: int


def ensure_chat_template(tokenizer: Any, choice: str | None = None) -> bool:
    """Give the tokenizer the template `choice` (None: its own, ChatML if it has none; see data.templates)
    and a pad token. True when the ChatML fallback was set."""
    had_one = bool(getattr(tokenizer, "chat_template", None))
    apply_chat_template_choice(tokenizer, choice)
    return not had_one and not choice


def _template(tokenizer: Any) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool) -> str:
    # Batched form (a list of one conversation) so that an empty conversation renders too.
    rendered = tokenizer.apply_chat_template(
        [list(messages)],
        chat_template=_template(tokenizer),
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    return rendered[0]


def _is_text(messages: Sequence[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "text"


def _text_ids(text: str, tokenizer: Any, add_eos: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _assistant_spans(messages: Sequence[dict], tokenizer: Any, full: str) -> list[tuple[int, int]]:
    """Character spans of `full` that belong to assistant turns (content + end-of-turn token)."""
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise UserError(
                f"the chat template is not prefix-stable at message {i + 1} (rendering a shorter conversation "
                "changes earlier text), so assistant tokens cannot be located; use a template that renders "
                "turns independently, or train_on='all'"
            )
        # Whitespace after the end-of-turn token (ChatML's trailing newline) carries no loss.
        end = len(upto.rstrip())
        spans.append((len(before), end if end > len(before) else len(upto)))
    return spans


def _tokenize_with_spans(
    full: str, spans: list[tuple[int, int]], tokenizer: Any
) -> tuple[list[int], list[bool]]:
    """Token ids of `full` and, per token, whether it overlaps one of the character spans."""
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):
        return _tokenize_pieces(full, spans, tokenizer)
    ids = list(enc["input_ids"])
    mask = [any(end > a and start < b for a, b in spans) for start, end in offsets]
    return ids, mask


def _tokenize_pieces(full: str, spans: list[tuple[int, int]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Fallback for tokenizers without offsets: tokenize the text between span boundaries separately."""
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for a, b in [*spans, (len(full), len(full))]:
        for piece, supervised in ((full[pos:a], False), (full[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                mask += [supervised] * len(piece_ids)
        pos = b
    return ids, mask


def encode_conversation(
    messages: Sequence[dict], tokenizer: Any, max_seq_length: int | None, train_on: str = "assistant"
) -> tuple[Example, int]:
    """Tokenize one conversation with loss masks; return the (possibly truncated) example and its full length.

    train_on="assistant": loss on assistant contents and their end-of-turn tokens only; "all": every token.
    A plain-text conversation (one "text" message) is tokenized as the tokenizer does (BOS), plus EOS,
    with loss on every token.
    """
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on={train_on!r}: choose one of {', '.join(TRAIN_ON)}")
    if _is_text(messages):
        ids = _text_ids(messages[0]["content"], tokenizer, add_eos=True)
        labels = list(ids)
    else:
        full = _render(tokenizer, messages, generation_prompt=False)
        spans = [(0, len(full))] if train_on == "all" else _assistant_spans(messages, tokenizer, full)
        ids, mask = _tokenize_with_spans(full, spans, tokenizer)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    length = len(ids)
    if max_seq_length is not None and length > max_seq_length:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return Example(input_ids=ids, labels=labels), length


def conversation_length(messages: Sequence[dict], tokenizer: Any) -> int:
    """Token count of a conversation as encode_conversation would produce it, without computing masks."""
    if _is_text(messages):
        return len(_text_ids(messages[0]["content"], tokenizer, add_eos=True))
    full = _render(tokenizer, messages, generation_prompt=False)
    return len(tokenizer(full, add_special_tokens=False)["input_ids"])


def encode_dataset(
    conversations: Sequence[Sequence[dict]],
    tokenizer: Any,
    max_seq_length: int | None,
    train_on: str = "assistant",
) -> tuple[list[Example], EncodeStats]:
    """Encode every conversation; truncate long ones from the right, drop those left without loss tokens."""
    examples: list[Example] = []
    lengths: list[int] = []
    n_truncated = n_dropped = supervised = 0
    for messages in conversations:
        example, length = encode_conversation(messages, tokenizer, max_seq_length, train_on=train_on)
        lengths.append(length)
        n_truncated += max_seq_length is not None and length > max_seq_length
        n_sup = sum(label != IGNORE_INDEX for label in example.labels)
        if n_sup == 0:
            n_dropped += 1
            continue
        supervised += n_sup
        examples.append(example)
    if n_truncated:
        log.warning(
            "%d of %d examples are longer than max_seq_length=%s tokens and were truncated (longest: %d)",
            n_truncated,
            len(lengths),
            max_seq_length,
            max(lengths),
        )
    if n_dropped:
        log.warning("%d examples had no supervised token left after truncation and were dropped", n_dropped)
    if conversations and not examples:
        raise UserError(
            f"no example has a supervised token within max_seq_length={max_seq_length}: "
            "raise max_seq_length or shorten the prompts"
        )
    stats = EncodeStats(
        n_examples=len(examples),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
        lengths=lengths,
        supervised_tokens=supervised,
    )
    return examples, stats


def prompt_ids(messages: str | Sequence[dict], tokenizer: Any) -> list[int]:
    """Token ids of a generation prompt: the template with the assistant header appended.

    A plain string becomes one user message; a plain-text conversation is tokenized as is (no EOS).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if _is_text(messages):
        return _text_ids(messages[0]["content"], tokenizer, add_eos=False)
    text = _render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(model_path: Any) -> Any:
    """AutoTokenizer from a local folder, or from a Hub model (a `ModelSource` or an id, pinned to its commit);
    UserError if it cannot be read."""
    from transformers import AutoTokenizer

    from qlora_lite.model.source import looks_like_hub_id, resolve_model_source

    if hasattr(model_path, "config_path"):  # a resolved ModelSource
        name, kwargs = model_path.name, model_path.pretrained_kwargs()
    elif os.path.isdir(model_path):  # a folder holding only tokenizer files is enough here
        name, kwargs = str(model_path), {"local_files_only": True}
    elif looks_like_hub_id(str(model_path)):
        source = resolve_model_source(model_path)
        name, kwargs = source.name, source.pretrained_kwargs()
    else:
        raise UserError(
            f"model folder {model_path} not found: give a local folder holding the tokenizer files"
        )
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load a tokenizer from {name} ({str(exc).splitlines()[0]}); the model needs tokenizer files"
        ) from exc


def token_lengths(
    source: Any,
    model_path: str | os.PathLike,
    format: str | None = None,
    columns: dict[str, str] | None = None,
) -> list[int]:
    """Untruncated token length of every example in `source`, with the tokenizer of `model_path`."""
    from qlora_lite.data.formats import load_dataset_for_training, to_conversations, to_labeled_texts

    records, spec = load_dataset_for_training(source, format=format, columns=columns)
    tokenizer = load_tokenizer(model_path)
    if spec.task == "classification":
        return [len(tokenizer(text)["input_ids"]) for text, _ in to_labeled_texts(records, spec)]
    return [conversation_length(messages, tokenizer) for messages in to_conversations(records, spec)]
