"""Tokenizers for tests, built without the network.

- `build_tiny_tokenizer()`: a byte-level BPE trained in-process on a few sentences (a few hundred tokens),
  with the ChatML special tokens <|im_start|>, <|im_end|> (also eos) and <pad>, and NO chat template.
  `save_pretrained` works, so tiny Llama/Qwen2 test models can be saved next to it
  (use ``len(tokenizer)`` as the model's vocab_size).
- `load_demo_tokenizer()`: the real SmolLM2-135M-Instruct tokenizer (skips the test if it is unavailable).

Import with ``from tokenizers_util import build_tiny_tokenizer`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>")

DEFAULT_VOCAB_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question in one short sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to French: good morning. Bonjour.",
    "Summarise the text below and return the answer as JSON with keys name, age and city.",
    'Alice is 30 years old and lives in Berlin. {"name": "Alice", "age": 30, "city": "Berlin"}',
    "user assistant system instruction input output question answer prompt completion",
    "Hello! How are you today? I am fine, thank you. Tell me a joke about cats and dogs.",
    "1 2 3 4 5 6 7 8 9 10 100 1000, numbers and words: zero one two three four five six seven eight nine.",
    "The model learns to follow instructions from examples; loss is computed on the answers only.",
)


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_texts: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(vocab_texts) * 4, trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_texts: Sequence[str] | None = None, vocab_size: int = 512):
    """A fresh (mutable) tiny byte-level BPE tokenizer; identical vocab on every call with the same texts."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    texts = tuple(vocab_texts) if vocab_texts is not None else DEFAULT_VOCAB_TEXTS
    backend = Tokenizer.from_str(_tokenizer_json(texts, vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        extra_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )


def load_demo_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (has its own chat template); skips the test if missing."""
    import pytest
    from transformers import AutoTokenizer

    from qlora_lite.demo.model import ensure_demo_model
    from qlora_lite.errors import UserError

    try:
        path = ensure_demo_model()
    except UserError as exc:
        pytest.skip(f"demo model unavailable: {exc}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
