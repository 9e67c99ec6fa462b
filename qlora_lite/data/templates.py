"""Chat templates and where a turn ends: the template a run trains with, and the tokens generation stops at.

`--chat-template` is the tokenizer's own by default (ChatML when it has none), a named one (`chatml`,
`llama3`, `gemma`) or a Jinja file. The end-of-turn marker is read off the template itself (what it renders
right after an assistant message), so it is right for any template. A model learns to end its answers with
that marker; when it is not the model's EOS (Qwen2.5 base: learns `<|im_end|>`, EOS `<|endoftext|>`; any model
on the ChatML fallback) generation must stop on it too: `stop_token_ids` gives both, and the run folder's
generation_config.json carries them for plain transformers + PEFT users.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}
_SENTINEL = "qlora-lite-end-of-turn-probe"


def template_text(choice: str) -> str:
    """The Jinja text of a named template or of a template file."""
    if choice in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[choice]
    path = Path(choice).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if "messages" not in text:
            raise UserError(
                f"chat template file {path} does not loop over `messages`: is it a Jinja chat template?"
            )
        return text
    raise UserError(
        f"chat template {choice!r} is neither one of {', '.join(NAMED_TEMPLATES)} nor a Jinja file here; "
        "leave it unset to use the tokenizer's own"
    )


def apply_chat_template_choice(tokenizer: Any, choice: str | None) -> str:
    """Give `tokenizer` the template to train with; returns its name for the run record.

    None: the tokenizer's own, or ChatML when it has none. The tokenizer saved with the run carries it.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            log.warning("tokenizer has neither a pad nor an eos token; padding will fail")
    if choice:
        tokenizer.chat_template = template_text(choice)
        name = choice if choice in NAMED_TEMPLATES else Path(choice).name
    elif getattr(tokenizer, "chat_template", None):
        name = "tokenizer"
    else:
        tokenizer.chat_template = CHATML
        name = "chatml (the tokenizer has none)"
        log.info("tokenizer has no chat template: using the default ChatML template")
    _check_renders(tokenizer, name)
    marker = end_of_turn(tokenizer)
    if marker and single_token_id(tokenizer, marker) is None:
        log.warning(
            "the chat template ends a turn with %r, which is not one token of this tokenizer: it is learned as "
            "text, and generation stops on that text",
            marker,
        )
    return name


def _check_renders(tokenizer: Any, name: str) -> None:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception as exc:  # jinja2 raises several types
        raise UserError(f"chat template {name} does not render a user/assistant exchange: {exc}") from None
    if _SENTINEL not in text:
        raise UserError(f"chat template {name} drops the assistant's message: it cannot be trained on")


def end_of_turn(tokenizer: Any) -> str | None:
    """What the template writes right after an assistant message: its end-of-turn marker (None: nothing).

    A special token at the start of it wins (`<|im_end|>` of "<|im_end|>\\n"); otherwise the text, stripped.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render has no marker we could use
        return None
    tail = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
    stripped = tail.strip()
    if not stripped:
        return None
    specials = sorted(
        set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab()),
        key=len,
        reverse=True,
    )
    for token in specials:
        if token and stripped.startswith(token):
            return token
    return stripped


def single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The model's EOS id(s) plus the template's end-of-turn token: generation stops at whichever comes."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    marker = end_of_turn(tokenizer)
    if marker:
        token_id = single_token_id(tokenizer, marker)
        if token_id is not None:
            ids.append(token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


def stop_strings(tokenizer: Any) -> list[str]:
    """An end-of-turn marker that is several tokens (cut from answers after generation)."""
    marker = end_of_turn(tokenizer)
    return [marker] if marker and single_token_id(tokenizer, marker) is None else []


def generation_config_for(model: Any, tokenizer: Any):
    """The base model's generation config with the stop tokens of the trained template and the pad token."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    config.eos_token_id = stop_token_ids(tokenizer, base)
    config.pad_token_id = tokenizer.pad_token_id
    return config
