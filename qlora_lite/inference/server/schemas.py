"""Request bodies (validated) and answer bodies, in the shapes of OpenAI's API and vLLM's LoRA endpoints.

Fields a client commonly sends but that change nothing here (`user`, `presence_penalty`, ...) are accepted
and ignored, as vLLM does; fields that would change the answer and are not supported (`n` > 1, `logprobs`,
`tools`, `echo`, `suffix`) are refused with a 400 that names them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    # Parameters that change the answer and that this server does not implement.
    unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Body:
        extra = self.model_extra or {}
        for name in self.unsupported:
            value = extra.get(name)
            if value not in (None, False, 0, [], ""):
                raise ValueError(f"{name} is not supported by this server; leave it out")
        return self


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per answer")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops or None

    @property
    def include_usage_chunk(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's new name for "system"; chat templates know only the old one.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    unsupported = ("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "response_format")
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]

    def route_text(self) -> str:
        """What the router reads: the last user message (the request being asked now)."""
        users = [m for m in self.prompt() if m["role"] == "user"]
        return (users or self.prompt())[-1]["content"]


class CompletionRequest(_Sampling):
    unsupported = ("logprobs", "echo", "suffix", "best_of")
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("give one prompt per request (a string, or a list of one string)")
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("the prompt must be a non-empty string (token id lists are not supported)")
        return prompt

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def as_prompt(self) -> list[dict[str, str]]:
        # The "text" role is the encoder's raw-text form: no chat template, as /v1/completions means.
        return [{"role": "text", "content": self.prompt}]


class ClassifyRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("input must be a non-empty string or a list of non-empty strings")
        return texts


class LoadLoraRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# ---- answers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the engine hands back for one generation request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str  # the name that answered: the base id or an adapter
    route: dict[str, Any] | None = None  # for model "auto": {"adapter", "score", "reason"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _extras(answer: Answer) -> dict[str, Any]:
    return {"route": answer.route} if answer.route is not None else {}


def chat_completion(answer: Answer) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": usage(answer.prompt_tokens, answer.completion_tokens),
        **_extras(answer),
    }


def text_completion(answer: Answer) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": answer.model,
        "choices": [
            {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
        ],
        "usage": usage(answer.prompt_tokens, answer.completion_tokens),
        **_extras(answer),
    }


@dataclass
class ChunkWriter:
    """The `data:` payloads of one streamed answer, in OpenAI's chunk shape (same id and time throughout)."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")
        self.created = self.created or int(time.time())

    def _chunk(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
            **extra,
        }

    def delta(self, text: str, *, first: bool = False, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk(choice)

    def finish(self, answer: Answer) -> dict[str, Any]:
        """The last choice chunk: empty text, the finish reason, and the usage (vLLM's continuous usage)."""
        chunk = self.delta("", finish_reason=answer.finish_reason)
        chunk["usage"] = usage(answer.prompt_tokens, answer.completion_tokens)
        return {**chunk, **_extras(answer)}

    def usage_only(self, answer: Answer) -> dict[str, Any]:
        """OpenAI's `stream_options.include_usage` chunk: no choices, only the usage."""
        return self._chunk(None, usage=usage(answer.prompt_tokens, answer.completion_tokens))


def model_card(name: str, *, root: str, parent: str | None, created: int, **extra: Any) -> dict[str, Any]:
    """One entry of GET /v1/models, with vLLM's `root` (where it came from) and `parent` (its base)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "qlora-lite",
        "root": root,
        "parent": parent,
        **extra,
    }


def classification(model: str, results: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    """vLLM's /v1/classify answer (`label`, `probs`, `num_classes`), plus the probabilities by label."""
    data = [
        {
            "index": i,
            "label": r["label"],
            "probs": list(r["probabilities"].values()),
            "num_classes": len(r["probabilities"]),
            "probabilities": r["probabilities"],
        }
        for i, r in enumerate(results)
    ]
    return {
        "id": new_id("classify"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage(prompt_tokens, 0),
    }
