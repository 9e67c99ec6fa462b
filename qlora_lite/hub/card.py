"""The model card of a pushed adapter, rendered with huggingface_hub's own ModelCard from the run record.

The card's `base_model` is always a Hub id, never a local path (a local path breaks the card and the Hub's
model tree: transformers #33922).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qlora_lite.options import OPTIONS
from qlora_lite.run_files import RUN_RECORD

REPO_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")


def base_hub_id(record: dict) -> str | None:
    """The base model's Hub id, or None when it was a local folder whose origin is not recorded.

    A recorded `base_model.hub_id` wins; a path inside the HF cache (`models--org--name/snapshots/...`)
    names its repo; a path that was not a folder at training time was a Hub id. Never a local path
    (a local path as `base_model` breaks the card and the Hub's model tree: transformers #33922).
    """
    base = record.get("base_model") or {}
    if base.get("hub_id"):
        return str(base["hub_id"])
    path = str(base.get("path") or "")
    cached = re.search(r"models--([\w.-]+)--([\w.-]+)[/\\]snapshots[/\\]", path)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    revision = base.get("revision") or ""
    if REPO_ID_PATTERN.match(path) and not path.startswith((".", "~")) and not revision.startswith("local-"):
        return path
    return None


def base_name(record: dict) -> str:
    """A short name for the base model: 'SmolLM2-135M-Instruct'."""
    hub_id = base_hub_id(record)
    path = hub_id or str((record.get("base_model") or {}).get("path") or "base model")
    return path.rstrip("/\\").replace("\\", "/").split("/")[-1]


def _dataset_ids(record: dict) -> list[str] | None:
    source = str((record.get("data") or {}).get("hub_id") or (record.get("data") or {}).get("source") or "")
    if REPO_ID_PATTERN.match(source) and not Path(source).suffix and not Path(source).exists():
        return [source]
    return None


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _hardware_text(hw: dict) -> str:
    gpus = hw.get("gpus") or []
    if gpus:
        names = {g.get("name", "GPU") for g in gpus}
        text = f"{len(gpus)} x {', '.join(sorted(names))} ({_size(gpus[0].get('total_memory_bytes'))} each)"
    else:
        text = f"CPU ({hw.get('cpu_count', '?')} cores, {_size(hw.get('ram_total_bytes'))} RAM)"
    return text + (f", {hw['environment']}" if hw.get("environment") not in (None, "local") else "")


def _rows(pairs: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in pairs if value not in (None, "", [])]
    return "\n".join(lines)


def setting_rows(record: dict) -> list[tuple[str, Any]]:
    """One row per option declared with a `card` label: the plan's value for planner knobs, else the setting."""
    plan, hp, lora = (record.get(key) or {} for key in ("plan", "hyperparameters", "lora"))
    rows = []
    for option in OPTIONS:
        if option.card:
            value = plan.get(option.name, hp.get(option.name))
            if value is None:  # e.g. lora_alpha None: the record's "lora" holds what was used
                value = lora.get(option.name.removeprefix("lora_"))
            rows.append((option.card, value))
    return rows


def render_model_card(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> str:
    """README.md for the adapter repo, built with huggingface_hub's ModelCard from the run record."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(run_dir)
    record = json.loads((folder / RUN_RECORD).read_text())
    base_id = base_model or base_hub_id(record)
    quant = record.get("quantization") or {}
    plan, data, metrics = record.get("plan") or {}, record.get("data") or {}, record.get("metrics") or {}
    peft = record.get("peft") or {"method": "lora", "description": "LoRA"}
    method_tag = {"lora": "dora" if peft.get("lora_method") == "dora" else "lora"}.get(
        peft.get("method", "lora"), str(peft.get("method", "lora")).replace("_", "-")
    )
    tags = ["qlora_lite", "peft", method_tag] + (["qlora"] if quant.get("method") in ("nf4", "int8") else [])
    classifier = record.get("task") == "classification"
    if base_id:
        tags.append(f"base_model:adapter:{base_id}")
    card_data = ModelCardData(
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=tags,
        datasets=datasets or _dataset_ids(record),
        # The base model's license (from its Hub card, recorded at training time): an adapter inherits it.
        license=license or record.get("license") or (record.get("base_model") or {}).get("license"),
    )
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base_name(record)}`"
    if not base_id:
        base_text += " (a local model folder; load the same base model)"
    revision = (record.get("base_model") or {}).get("revision")
    setup = _rows([
        ("base model", base_text + (f" @ `{revision}`" if revision else "")),
        ("PEFT method", peft.get("description")),
        ("hardware", _hardware_text(record.get("hardware") or {})),
        ("data", f"{data.get('format')} format, {data.get('records')} records ({data.get('train_examples')} "
         f"train / {data.get('eval_examples')} eval), {data.get('truncated_examples', 0)} truncated"),
        ("data fingerprint", f"`{str(data.get('fingerprint', ''))[:16]}`" if data.get("fingerprint") else None),
        ("steps", metrics.get("steps")),
        ("time", _duration(metrics.get("seconds"))),
        ("throughput", f"{metrics['tokens_per_second']:.0f} tokens/s" if metrics.get("tokens_per_second") else None),
    ])  # fmt: skip
    plan_table = _rows([
        ("micro-batch x accumulation", f"{plan.get('micro_batch_size')} x {plan.get('gradient_accumulation_steps')}"
         f" = {plan.get('effective_batch_size')}"),
        *setting_rows(record),
        ("predicted peak memory", _size(plan.get("peak_memory_bytes")) if plan.get("peak_memory_bytes") else None),
        ("measured peak memory", _measured_peak(record, plan)),
    ])  # fmt: skip
    metric_table = _rows([
        ("train loss (last step)", metrics.get("train_loss")),
        ("eval loss", metrics.get("eval_loss")),
        ("eval perplexity", round(metrics["eval_perplexity"], 3) if metrics.get("eval_perplexity") else None),
        ("tokens seen", metrics.get("tokens_seen")),
    ])  # fmt: skip
    plot = "\n## Loss\n\n![training and eval loss](loss.png)\n" if (folder / "loss.png").is_file() else ""
    base_ref = base_id or "PATH/TO/THE/SAME/BASE/MODEL"
    base_args = f'"{base_ref}"'
    own_base = record.get("loftq_base")
    if own_base:  # LoftQ rewrote the 4-bit base: the adapter is right only on the base pushed beside it
        base_args = f'"{repo_id}", subfolder="{own_base["folder"]}"'
        base_text += (
            f" — LoftQ rewrote its 4-bit weights while fitting the adapter: load the base saved in "
            f"`{own_base['folder']}/` of this repo (a 4-bit transformers folder), not the original"
        )
    body = f"""
# {repo_id.split("/")[-1]}

A {peft.get("description", "LoRA")} adapter for {base_text}, trained with qlora_lite.
`run_record.json` in this repo holds the full record of the run (plan, data, metrics, library versions).

## Training setup

{setup}

### Settings and plan

{plan_table}

## Metrics

{metric_table}
{plot}
{_classifier_usage(repo_id, base_args) if classifier else _generation_usage(repo_id, base_args)}"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


def _generation_usage(repo_id: str, base_args: str) -> str:
    return f"""## Usage

With plain PEFT (`generation_config.json` holds the stop tokens: the model's EOS and the end of a turn):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

base = AutoModelForCausalLM.from_pretrained({base_args})
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model.generation_config = GenerationConfig.from_pretrained("{repo_id}")
chat = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
print(tokenizer.decode(model.generate(**chat, max_new_tokens=128)[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))
```

With qlora_lite (loads the base quantized as in training):

```python
from qlora_lite import generate

print(generate("Hello!", adapter="{repo_id}"))
```

or `qlora-lite generate {repo_id} --prompt "Hello!"`.
"""


def _classifier_usage(repo_id: str, base_args: str) -> str:
    return f"""## Usage

A text classifier: LoRA plus a trained head (saved through PEFT's `modules_to_save`); `labels.json` holds
the label names. With plain transformers + PEFT:

```python
import json

import torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

labels = json.load(open(hf_hub_download("{repo_id}", "labels.json")))
base = AutoModelForSequenceClassification.from_pretrained(
    {base_args}, num_labels=labels["num_labels"], id2label=labels["id2label"], label2id=labels["label2id"],
    pad_token_id=labels["pad_token_id"],
)
model = PeftModel.from_pretrained(base, "{repo_id}").eval()
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
with torch.no_grad():
    logits = model(**tokenizer(["turn the lights off"], return_tensors="pt")).logits
print(labels["names"][logits.argmax(-1).item()])
```

With qlora_lite: `qlora_lite.classify("{repo_id}", ["turn the lights off"])`, or
`qlora-lite classify {repo_id} "turn the lights off"`.
"""


def _measured_peak(record: dict, plan: dict) -> str | None:
    """The run's measured peak and how far the planner's prediction was from it (the planner's accuracy)."""
    measured = (record.get("measured_peak") or {}).get("bytes")
    if not measured:
        return None
    predicted = plan.get("peak_memory_bytes")
    off = f" (prediction {100 * (predicted - measured) / measured:+.0f}%)" if predicted else ""
    return f"{_size(measured)}{off}"
