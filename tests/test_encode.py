"""Chat template, tokenization, loss masks and truncation (qlora_lite.encode)."""

from __future__ import annotations

import json
import logging
import os

import pytest
from tokenizers_util import build_tiny_tokenizer, load_demo_tokenizer

from qlora_lite.data.encoding import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    encode_conversation,
    encode_dataset,
    ensure_chat_template,
    prompt_ids,
    token_lengths,
)
from qlora_lite.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIALOG = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": 'It is Berlin. {"city": "Berlin"}'},
]
PAIR = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello!"}]

LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def demo_tok():
    return load_demo_tokenizer()


@pytest.fixture
def tiny_tok():
    tok = build_tiny_tokenizer()
    assert ensure_chat_template(tok) is True
    return tok


@pytest.fixture(params=["tiny", "smollm2"])
def tok(request, tiny_tok):
    return tiny_tok if request.param == "tiny" else request.getfixturevalue("demo_tok")


def supervised_segments(example, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_ensure_chat_template_and_pad(demo_tok):
    tok = build_tiny_tokenizer()
    assert tok.chat_template is None
    assert ensure_chat_template(tok) is True and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ensure_chat_template(tok) is False
    assert ensure_chat_template(demo_tok) is False and "SmolLM" in demo_tok.chat_template
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    ensure_chat_template(tok)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_default_template_renders_chatml(tiny_tok):
    text = tiny_tok.apply_chat_template(PAIR, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_masks_cover_exactly_the_assistant_turns(tok):
    example, length = encode_conversation(DIALOG, tok, max_seq_length=None)
    assert length == len(example.input_ids) == len(example.labels)
    assert supervised_segments(example, tok) == [
        "The capital of France is Paris.<|im_end|>",
        'It is Berlin. {"city": "Berlin"}<|im_end|>',
    ]
    unsupervised = tok.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == IGNORE_INDEX]
    )
    for msg in DIALOG:
        if msg["role"] != "assistant":
            assert msg["content"] in unsupervised
    assert "assistant\n" in unsupervised  # the role header carries no loss


def test_training_tokens_match_generation_prompt(tok):
    """The prompt the model sees at inference is exactly the unlabelled prefix it was trained after."""
    example, _ = encode_conversation(PAIR, tok, max_seq_length=None)
    prompt = prompt_ids(PAIR[:1], tok)
    assert example.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt)])
    assert example.labels[len(prompt)] != IGNORE_INDEX
    assert prompt_ids("Say hi.", tok) == prompt


def test_train_on_all(tiny_tok):
    example, _ = encode_conversation(DIALOG, tiny_tok, max_seq_length=None, train_on="all")
    assert example.labels == example.input_ids
    with pytest.raises(UserError, match="train_on"):
        encode_conversation(DIALOG, tiny_tok, None, train_on="answers")


def test_plain_text_trains_on_every_token_and_ends_with_eos(tok):
    example, length = encode_conversation([{"role": "text", "content": "Once upon a time."}], tok, None)
    assert example.labels == example.input_ids and length == len(example.input_ids)
    assert example.input_ids[-1] == tok.eos_token_id
    assert tok.decode(example.input_ids, skip_special_tokens=True) == "Once upon a time."
    assert prompt_ids([{"role": "text", "content": "Once upon"}], tok)[-1] != tok.eos_token_id


def test_other_template_with_bos_and_trim(tiny_tok):
    tiny_tok.chat_template = LLAMA3_LIKE
    tiny_tok.bos_token = "<|im_start|>"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there \n"}]
    example, _ = encode_conversation(messages, tiny_tok, None)
    assert supervised_segments(example, tiny_tok) == ["Hello there<|eot_id|>"]
    assert example.input_ids[0] == tiny_tok.bos_token_id


def test_template_that_is_not_prefix_stable_fails_clearly(tiny_tok):
    tiny_tok.chat_template = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="not prefix-stable"):
        encode_conversation(DIALOG, tiny_tok, None)
    example, _ = encode_conversation(DIALOG, tiny_tok, None, train_on="all")
    assert example.labels == example.input_ids


class _NoOffsets:
    """A tokenizer wrapper without offset mappings, like a slow tokenizer."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self._inner(text, **kwargs)


def test_fallback_without_offsets_gives_the_same_masks(tiny_tok):
    expected, _ = encode_conversation(DIALOG, tiny_tok, None)
    got, _ = encode_conversation(DIALOG, _NoOffsets(tiny_tok), None)
    assert supervised_segments(got, tiny_tok) == supervised_segments(expected, tiny_tok)


def test_truncation_counted_and_dropped(tiny_tok, caplog):
    long_prompt = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer " * 80}]
    conversations = [PAIR, long_prompt, long_answer]
    full = [encode_conversation(c, tiny_tok, None)[1] for c in conversations]
    assert full[0] < 40 < min(full[1:])
    with caplog.at_level(logging.WARNING, logger="qlora_lite.data.encoding"):
        examples, stats = encode_dataset(conversations, tiny_tok, max_seq_length=40)
    assert stats.lengths == full
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 2, 1)
    assert [len(e.input_ids) for e in examples] == [full[0], 40]
    assert stats.supervised_tokens == sum(lab != IGNORE_INDEX for e in examples for lab in e.labels)
    assert "2 of 3 examples are longer than max_seq_length=40" in caplog.text
    assert "1 examples had no supervised token" in caplog.text
    with pytest.raises(UserError, match="max_seq_length=40"):
        encode_dataset([long_prompt], tiny_tok, max_seq_length=40)


def test_token_lengths_from_saved_tokenizer(tiny_tok, tmp_path):
    model_dir = tmp_path / "model"
    tiny_tok.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    rows = [
        {"instruction": "Say hi.", "output": "Hello!"},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    lengths = token_lengths(data, model_dir)
    assert lengths[0] == encode_conversation(PAIR, tiny_tok, None)[1]
    assert len(lengths) == 2 and lengths[1] > 0
    with pytest.raises(UserError, match="not found"):
        token_lengths(data, tmp_path / "missing")
