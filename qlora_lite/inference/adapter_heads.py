"""Classifier adapters on a causal-LM base: the LoRA weights go into the shared PeftModel, the head beside it.

A classifier run trains LoRA on `*ForSequenceClassification`, whose backbone is the causal LM's backbone
(same module names), plus a `score` head saved whole. So one loaded base answers both: generation through the
LM head, classification through the backbone + that adapter's head, pooled at the last non-pad token exactly
as transformers' sequence-classification models pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from qlora_lite.errors import UserError
from qlora_lite.inference.adapter_source import AdapterSource
from qlora_lite.run_files import ADAPTER_WEIGHTS, LABELS_FILE

HEAD_NAMES = ("score", "classifier")


@dataclass
class ClassifierHead:
    score: torch.nn.Linear
    labels: tuple[str, ...]
    pad_token_id: int | None
    max_length: int | None


def load_classifier_adapter(
    peft: Any, base_model: Any, name: str, source: AdapterSource
) -> tuple[Any, ClassifierHead]:
    """Add the classifier's LoRA weights to `peft` (made from `base_model` if None) under `name`; its head apart."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    labels_path = source.folder / LABELS_FILE
    if not labels_path.is_file():
        raise UserError(
            f"classifier adapter {name!r} ({source.source}) has no {LABELS_FILE}: it is not a classifier run"
        )
    mapping = json.loads(labels_path.read_text())
    weights = load_file(str(source.folder / ADAPTER_WEIGHTS))
    head = {k: v for k, v in weights.items() if k.split(".")[-2] in HEAD_NAMES and "lora_" not in k}
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    if not any(k.endswith(".weight") for k in head):
        raise UserError(
            f"classifier adapter {name!r} ({source.source}) holds no score/classifier head weights"
        )
    fields = {k: v for k, v in source.config.items() if k in LoraConfig.__dataclass_fields__}
    # The head lives outside the shared model; the LoRA matrices are the causal LM's own module names.
    fields.update(task_type="CAUSAL_LM", modules_to_save=None, inference_mode=True)
    config = LoraConfig(**fields)
    if peft is None:
        peft = get_peft_model(base_model, config, adapter_name=name)
    else:
        peft.add_adapter(name, config)
    result = set_peft_model_state_dict(peft, lora, adapter_name=name)
    if result.unexpected_keys:
        peft.delete_adapter(name)
        raise UserError(
            f"classifier adapter {name!r} ({source.source}) does not fit base: {len(result.unexpected_keys)} "
            f"weights have no place in it (e.g. {result.unexpected_keys[0]})"
        )
    weight = next(v for k, v in head.items() if k.endswith(".weight"))
    bias = next((v for k, v in head.items() if k.endswith(".bias")), None)
    device = next(base_model.parameters()).device
    score = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        score.weight.copy_(weight)
        if bias is not None:
            score.bias.copy_(bias)
    score = score.to(device).eval().requires_grad_(False)
    max_length = source.plan.get("max_seq_length")
    return peft, ClassifierHead(score, tuple(mapping["names"]), mapping.get("pad_token_id"), max_length)


def classify_rows(
    peft: Any, name: str, head: ClassifierHead, tokenizer: Any, texts: list[str], batch_size: int = 16
) -> list[dict[str, Any]]:
    """Labels and probabilities for `texts` through adapter `name` and its head (right-padded batches)."""
    for i, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"text {i} is empty or not a string ({text!r}): give non-empty texts to classify")
    kwargs = {"truncation": True, "max_length": head.max_length} if head.max_length else {}
    encoded = tokenizer(list(texts), **kwargs)["input_ids"]
    backbone = peft.get_base_model().base_model  # LlamaModel inside LlamaForCausalLM, etc.
    peft.set_adapter(name, inference_mode=True)
    pad = head.pad_token_id if head.pad_token_id is not None else tokenizer.pad_token_id
    device = next(peft.parameters()).device
    out: list[dict[str, Any]] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = head.score(hidden.to(head.score.weight.dtype))
        # The last non-pad token, found as transformers' *ForSequenceClassification find it.
        positions = torch.arange(width, device=device)
        last = (positions * (input_ids != pad).int()).argmax(-1)
        probs = logits[torch.arange(len(rows), device=device), last].float().softmax(-1).cpu()
        for row in probs:
            out.append(
                {
                    "label": head.labels[int(row.argmax())],
                    "probabilities": {
                        label: round(float(p), 6) for label, p in zip(head.labels, row, strict=True)
                    },
                }
            )
    return out
