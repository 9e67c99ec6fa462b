"""Training data: load a file, detect its format, validate it and normalise it to chat messages.

Every causal-LM format becomes a list of ``{"role", "content"}`` messages (system/user/assistant); plain text
becomes one ``{"role": "text"}`` message, meaning "no template, train on every token". Formats live in a
small registry (`_REGISTRY`): a name, the columns it needs (with accepted aliases) and the optional ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qlora_lite.data.reading import load_records  # noqa: F401 (re-exported)
from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

FORMATS = (
    "instruction",
    "prompt_completion",
    "question_answer",
    "chat",
    "sharegpt",
    "text",
    "classification",
)
_DETECT_ROWS = 32  # detection looks at the keys of this many leading records


@dataclass(frozen=True)
class FormatSpec:
    """A detected (or user-named) data format and the column that plays each role."""

    name: str
    columns: dict[str, str]
    reason: str
    task: str


@dataclass(frozen=True)
class _Format:
    """A registry entry: role -> accepted column names (in display order), and which roles are optional."""

    name: str
    task: str
    roles: dict[str, tuple[str, ...]]
    optional: frozenset[str] = frozenset()

    @property
    def required(self) -> dict[str, tuple[str, ...]]:
        return {r: a for r, a in self.roles.items() if r not in self.optional}


# Detection order matters: the first format whose required columns are all present wins
# (so text+label is classification before it is plain text).
_REGISTRY: tuple[_Format, ...] = (
    _Format("chat", "causal_lm", {"messages": ("messages",)}),
    _Format("sharegpt", "causal_lm", {"conversations": ("conversations",)}),
    _Format(
        "instruction",
        "causal_lm",
        {
            "system": ("system",),
            "instruction": ("instruction",),
            "input": ("input", "context"),
            "output": ("output", "response"),
        },
        optional=frozenset({"system", "input"}),
    ),
    _Format("prompt_completion", "causal_lm", {"prompt": ("prompt",), "completion": ("completion",)}),
    _Format("question_answer", "causal_lm", {"question": ("question",), "answer": ("answer",)}),
    _Format(
        "classification",
        "classification",
        {
            "text": ("text", "sentence", "content"),
            "label": ("label", "labels", "category", "intent", "class"),
        },
    ),
    _Format("text", "causal_lm", {"text": ("text",)}),
)
_BY_NAME = {f.name: f for f in _REGISTRY}
assert tuple(sorted(_BY_NAME)) == tuple(sorted(FORMATS))

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


# ---------------------------------------------------------------------------------------------- loading


def detect_format(
    records: Sequence[Mapping], format: str | None = None, columns: dict[str, str] | None = None
) -> FormatSpec:
    """Pick the data format from the records' columns, or check the one the user named.

    `columns` maps roles to column names (e.g. ``{"instruction": "q", "output": "a"}``) when the file
    uses other names than the ones detection knows.
    """
    seen = _seen_columns(records)
    columns = dict(columns or {})
    for role, col in columns.items():
        if col not in seen:
            raise UserError(
                f"column {col!r} (mapped to {role!r}) is not in the data; columns seen: {_names(seen)}"
            )
    if format is not None:
        if format not in _BY_NAME:
            raise UserError(f"unknown data format {format!r}; choose one of: {', '.join(FORMATS)}")
        fmt = _BY_NAME[format]
        resolved, missing = _resolve(fmt, seen, columns)
        if missing:
            wanted = ", ".join(f"{r} (one of {'/'.join(fmt.required[r])})" for r in missing)
            raise UserError(
                f"format {format!r} needs columns {wanted}, but the data has {_names(seen)}; "
                f"rename them or map them, e.g. columns={{{missing[0]!r}: 'your_column'}}"
            )
        return _spec(fmt, resolved, f"format {format!r} given; columns {_cols(resolved)}")
    for fmt in _REGISTRY:
        if not set(columns) <= set(fmt.roles):
            continue
        resolved, missing = _resolve(fmt, seen, columns)
        if not missing:
            how = "mapped" if columns else "found"
            return _spec(fmt, resolved, f"columns {_cols(resolved)} {how}")
    expected = "; ".join(f"{f.name}: {'+'.join('/'.join(a) for a in f.required.values())}" for f in _REGISTRY)
    raise UserError(
        f"cannot tell the data format from columns {_names(seen)}; expected one of [{expected}]. "
        "Rename the columns, or pass format=... and columns={role: column}"
    )


def _seen_columns(records: Sequence[Mapping]) -> list[str]:
    seen: dict[str, None] = {}
    for row in list(records[:_DETECT_ROWS]):
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _resolve(fmt: _Format, seen: list[str], columns: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Map each role of `fmt` to a column: user mapping first, then aliases (case-insensitive)."""
    lower = {c.lower(): c for c in seen}
    used = set(columns.values())
    resolved: dict[str, str] = {}
    for role, aliases in fmt.roles.items():
        if role in columns:
            resolved[role] = columns[role]
            continue
        for alias in aliases:
            col = lower.get(alias)
            if col is not None and col not in used:
                resolved[role] = col
                used.add(col)
                break
    missing = [r for r in fmt.required if r not in resolved]
    return {r: resolved[r] for r in fmt.roles if r in resolved}, missing


def _spec(fmt: _Format, resolved: dict[str, str], reason: str) -> FormatSpec:
    return FormatSpec(name=fmt.name, columns=resolved, reason=reason, task=fmt.task)


def _names(cols: Iterable[str]) -> str:
    cols = list(cols)
    return ", ".join(cols) if cols else "(none)"


def _cols(resolved: dict[str, str]) -> str:
    return "/".join(resolved.values())


# -------------------------------------------------------------------------------------- normalisation


def to_conversations(records: Sequence[Mapping], spec: FormatSpec) -> list[list[dict]]:
    """Turn every record into chat messages; raise UserError naming the record (1-based) and field."""
    if spec.task != "causal_lm":
        raise UserError(
            f"format {spec.name!r} is a {spec.task} task, not text generation: use to_labeled_texts"
        )
    return [_conversation(row, spec, i) for i, row in enumerate(records, start=1)]


def to_labeled_texts(records: Sequence[Mapping], spec: FormatSpec) -> list[tuple[str, Any]]:
    """For classification data: validated (text, label) pairs."""
    if spec.task != "classification":
        raise UserError(f"format {spec.name!r} has no labels: it is not a classification data set")
    pairs = []
    for i, row in enumerate(records, start=1):
        text = _text_field(row, spec.columns["text"], i)
        label = row.get(spec.columns["label"])
        if label is None or (isinstance(label, str) and not label.strip()):
            raise UserError(
                f"record {i}: field {spec.columns['label']!r} is missing or empty; give every text a label"
            )
        pairs.append((text, label))
    return pairs


def _conversation(row: Mapping, spec: FormatSpec, index: int) -> list[dict]:
    cols = spec.columns
    if spec.name in ("chat", "sharegpt"):
        key = cols["messages" if spec.name == "chat" else "conversations"]
        return _messages(row.get(key), key, index)
    if spec.name == "text":
        return [{"role": "text", "content": _text_field(row, cols["text"], index)}]
    user_role, answer_role = {
        "instruction": ("instruction", "output"),
        "prompt_completion": ("prompt", "completion"),
        "question_answer": ("question", "answer"),
    }[spec.name]
    prompt, answer = row.get(cols[user_role]), row.get(cols[answer_role])
    if spec.name == "prompt_completion" and isinstance(prompt, list):  # conversational prompt/completion
        msgs = _messages(prompt, cols[user_role], index, need_assistant=False)
        if isinstance(answer, list):
            return msgs + _messages(answer, cols[answer_role], index)
        return [*msgs, {"role": "assistant", "content": _text_field(row, cols[answer_role], index)}]
    user = _text_field(row, cols[user_role], index)
    if "input" in cols:
        extra = row.get(cols["input"])
        if extra is not None and str(extra).strip():
            user = f"{user}\n\n{extra}"
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text_field(row, cols[answer_role], index)},
    ]
    system = row.get(cols["system"]) if "system" in cols else None
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _text_field(row: Mapping, col: str, index: int) -> str:
    value = row.get(col)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"record {index}: field {col!r} is missing or empty; fill it in or remove the record")
    if not isinstance(value, str):
        if isinstance(value, (int, float)):
            return str(value)
        raise UserError(f"record {index}: field {col!r} holds a {type(value).__name__}, expected text")
    return value


def _messages(value: Any, col: str, index: int, need_assistant: bool = True) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"record {index}: field {col!r} must be a non-empty list of messages")
    out = []
    for j, msg in enumerate(value, start=1):
        where = f"record {index}: {col}[{j}]"
        if not isinstance(msg, Mapping):
            raise UserError(f"{where} is a {type(msg).__name__}; expected {{'role': ..., 'content': ...}}")
        raw_role = msg.get("role") if msg.get("role") is not None else msg.get("from")
        content = msg.get("content") if msg.get("content") is not None else msg.get("value")
        role = _ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise UserError(
                f"{where}: role {raw_role!r} is not one of {', '.join(sorted(_ROLE_ALIASES))} "
                "(keys 'role'/'content' or ShareGPT 'from'/'value')"
            )
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            parts = [
                p.get("text") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text"
            ]
            if not all(isinstance(part, str) for part in parts):
                raise UserError(f"{where}: a text part of the content holds no text (null or not a string)")
            content = "".join(parts)
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: message content is missing or empty; fill it in or drop the message")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"record {index}: {col!r} has no assistant message, so there is nothing to learn")
    return out


# ----------------------------------------------------------------------------- fingerprint and split


def fingerprint(records: Sequence[Mapping], spec: FormatSpec) -> str:
    """sha256 of the records (order matters) and the format; the same in every process."""
    digest = hashlib.sha256()
    head = {"format": spec.name, "columns": dict(sorted(spec.columns.items()))}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for row in records:
        digest.update(b"\n")
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    return digest.hexdigest()


def split_train_eval(
    items: list, eval_fraction: float = 0.1, seed: int = 0, min_eval: int = 1, max_eval: int = 200
) -> tuple[list, list]:
    """Deterministic train/eval split; both parts keep the original order."""
    if not 0 <= eval_fraction < 1:
        raise UserError(f"eval_fraction={eval_fraction} must be in [0, 1), e.g. 0.1; use 0 for no eval split")
    if eval_fraction == 0:
        return list(items), []
    if len(items) < 4:
        log.info("only %d examples: no eval split, all are used for training", len(items))
        return list(items), []
    n_eval = min(max(round(len(items) * eval_fraction), min_eval), max_eval, len(items) - 1)
    chosen = set(random.Random(seed).sample(range(len(items)), n_eval))
    train = [x for i, x in enumerate(items) if i not in chosen]
    held = [x for i, x in enumerate(items) if i in chosen]
    return train, held


def load_dataset_for_training(
    source: Any, format: str | None = None, columns: dict[str, str] | None = None
) -> tuple[list[dict], FormatSpec]:
    """Load records and detect their format, logging which format was picked and why."""
    records = load_records(source)
    spec = detect_format(records, format=format, columns=columns)
    log.info("data: %d examples, format %s (%s)", len(records), spec.name, spec.reason)
    return records, spec


def prompt_sample(conversations: Sequence[Sequence[Mapping]], limit: int = 64) -> list[str]:
    """The system + user side of up to `limit` conversations, spread evenly over them (a run keeps these in its
    record so a router can tell its domain later without the data file)."""
    step = max(1, len(conversations) // limit) if conversations else 1
    texts = []
    for messages in list(conversations)[::step][:limit]:
        text = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") in ("system", "user"))
        if text.strip():
            texts.append(text)
    return texts
