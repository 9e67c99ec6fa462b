"""Merge an adapter into its base the correct way, and save a plain transformers model folder.

Merging a QLoRA adapter straight into 4-bit weights re-quantizes them and degrades the output (peft #1043).
The adapter was trained against the *dequantized* 4-bit weights, so: load the base with the training
quantization config, dequantize exactly those weights to 16/32-bit, merge there, save in 16/32-bit. The
merged model's logits are then checked against base + adapter as trained, and the difference is recorded.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_lite.data.encoding import ensure_chat_template, prompt_ids
from qlora_lite.errors import UserError
from qlora_lite.inference.adapter_source import AdapterSource, has_tokenizer, read_adapter
from qlora_lite.inference.decoding import GENERATION_CONFIG, folder_eos_ids
from qlora_lite.model.loading import DTYPES, load_base_model, load_tokenizer
from qlora_lite.model.source import resolve_model_source

log = logging.getLogger(__name__)

MERGE_REPORT = "merge_report.json"
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Order: 2 apples and 1 pear, deliver to Berlin.",
)
REQUANTIZE_COST = (
    "re-quantizing merged weights to 4-bit rounds the adapter's small update into the NF4 grid, so much of "
    "what it learned is lost (peft #1043)"
)


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    max_abs_diff: float  # merged vs base + adapter as trained, over every position of the check prompts
    report: dict[str, Any]


def merge_adapter(
    adapter: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "bf16",
    revision: str | None = None,
    model: str | None = None,
    quantize: str | None = None,
    allow_requantize: bool = False,
    check_prompts: tuple[str, ...] = CHECK_PROMPTS,
) -> MergeResult:
    """Merge `adapter` (run folder or Hub id) into its base; save model + tokenizer + generation config.

    `quantize="nf4"` saves the merged model re-quantized to 4-bit, refused unless `allow_requantize`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize not in (None, "none", "nf4"):
        raise UserError(f"--quantize {quantize!r}: give nf4, or leave it out for a {dtype} model")
    if quantize == "nf4" and not allow_requantize:
        raise UserError(
            f"refusing to re-quantize the merged model to 4-bit: {REQUANTIZE_COST}. Keep the {dtype} model, serve "
            "base + adapter unmerged (AdapterSet), or pass --allow-requantize to accept the loss"
        )
    source = read_adapter(adapter, revision)
    if source.task != "causal_lm":
        raise UserError(f"{source.source} is a {source.task} adapter: merge supports causal LM adapters")
    if not (model or source.base):
        raise UserError(f"{source.source} names no base model: pass --model")
    base_source = resolve_model_source(model or source.base)  # a Hub base: pinned to the trained commit
    base = base_source.name
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: give a new --output folder")
    tokenizer = load_tokenizer(str(source.folder) if has_tokenizer(source.folder) else base_source)
    ensure_chat_template(tokenizer)
    ids = [torch.tensor([prompt_ids(p, tokenizer)]) for p in check_prompts]
    trained = source.quantization or "none"
    plan = source.plan
    settings = dict(
        revision=base_source.revision,
        double_quant=plan.get("double_quant", True),
        compute_dtype=plan.get("compute_dtype", "fp32"),
        accelerator="cuda" if torch.cuda.is_available() else "cpu",
    )
    started = time.monotonic()
    reference = _logits(_with_adapter(load_base_model(base, quantization=trained, **settings), source), ids)
    gc.collect()
    merged, unmerged = merge_into_base(base, source, trained, dtype, settings, ids)
    got = _logits(merged, ids)
    diff = _max_diff(got, reference)
    exact = _max_diff(got, unmerged)
    out.mkdir(parents=True, exist_ok=True)
    requant_diff = None
    if quantize == "nf4":
        merged.save_pretrained(out / ".merged-16bit")
        del merged
        gc.collect()
        merged = load_base_model(
            str(out / ".merged-16bit"),
            quantization="nf4",
            **{**settings, "compute_dtype": "fp32", "revision": None},
        )
        requant_diff = max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(_logits(merged, ids), reference, strict=True)
        )
        log.warning("re-quantized to NF4: max logit difference %.4g (16-bit merge: %.3g)", requant_diff, diff)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _save_generation_config(merged, source, out)
    if quantize == "nf4":
        import shutil

        shutil.rmtree(out / ".merged-16bit")
    report = {
        "adapter": source.source,
        "base": base,
        "trained_quantization": trained,
        "dtype": dtype,
        "quantized_to": quantize or "none",
        "check_prompts": len(check_prompts),
        "max_abs_logit_diff": diff,
        "reference": f"base loaded as trained ({trained}) + adapter, unmerged",
        "max_abs_logit_diff_unmerged_same_weights": exact,
        "requantized_max_abs_logit_diff": requant_diff,
        "seconds": round(time.monotonic() - started, 2),
    }
    (out / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info("merged %s into %s -> %s (max logit diff %.3g)", source.source, base, out, diff)
    return MergeResult(out, diff, report)


def merge_into_base(
    base: str, source: AdapterSource, trained: str, dtype: str, settings: dict, ids: list[torch.Tensor]
) -> tuple[Any, list[torch.Tensor]]:
    """The merged model (base dequantized if it was trained quantized, in `dtype`, adapter merged), and the
    logits of `ids` through the same weights with the adapter still unmerged (the merge's exact reference)."""
    if trained in ("nf4", "int8"):
        model = load_base_model(base, quantization=trained, **settings)
        # Exactly the weights the adapter was trained against, dequantized (not the original 16-bit weights).
        model = model.dequantize(dtype=DTYPES[dtype])
    else:
        model = load_base_model(base, quantization="none", **{**settings, "compute_dtype": dtype})
    model = model.to(DTYPES[dtype])
    peft = _with_adapter(model, source)
    unmerged = _logits(peft, ids)
    merged = peft.merge_and_unload()
    merged.config.use_cache = True
    return merged, unmerged


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def _with_adapter(model: Any, source: AdapterSource) -> Any:
    from peft import PeftModel

    model.config.use_cache = True
    return PeftModel.from_pretrained(model, str(source.folder)).eval()


@torch.no_grad()
def _logits(model: Any, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=x.to(device)).logits.float().cpu() for x in ids]


def _save_generation_config(model: Any, source: AdapterSource, out: Path) -> None:
    """The base's generation config, with the end-of-turn token the adapter learned added to its stop tokens."""
    config = model.generation_config
    extra = folder_eos_ids(source.folder)
    if extra:
        current = config.eos_token_id
        current = [] if current is None else ([current] if isinstance(current, int) else list(current))
        config.eos_token_id = list(dict.fromkeys([*current, *extra]))
    config.save_pretrained(out)
    if not (out / GENERATION_CONFIG).is_file():  # pragma: no cover - transformers always writes it
        raise UserError(f"could not write {out / GENERATION_CONFIG}")
