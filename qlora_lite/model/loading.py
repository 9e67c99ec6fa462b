"""Load a base model (4-bit NF4, 8-bit or 16/32-bit) and attach LoRA; load base + adapter for inference."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_lite.compat import keep_4bit_weights_differentiable
from qlora_lite.errors import UserError
from qlora_lite.run_files import RUN_RECORD

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZATIONS = ("nf4", "int8", "none")
CLASSIFIER_HEADS = ("score", "classifier")  # the head of decoder / encoder *ForSequenceClassification models


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int | None = None  # None: 2 * r, the common choice
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    # Further peft.LoraConfig keywords, from the options declared with `lora=` (qlora_lite.options).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"compute dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def resolve_model(model: str | os.PathLike) -> str:
    """A local folder with config.json, or a Hub id (only reachable when the user is online)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {path} has no config.json: point --model at a Hugging Face model folder"
            )
        return str(path)
    # A Hub id is "name" or "owner/name"; anything else that is not a folder is a path that does not exist.
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"model {text!r} not found: it is not a local folder"
            + (" (and HF_HUB_OFFLINE=1 forbids the Hub)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
            + "; give a folder holding config.json or a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    return text


def quantization_config(quantization: str, double_quant: bool, compute_dtype: str):
    """The bitsandbytes config for the base weights, or None for a 16/32-bit base."""
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        )
    raise UserError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")


def device_map_for(accelerator: str) -> dict[str, Any] | str:
    if accelerator == "cuda":
        # One process per GPU under torchrun/accelerate: each loads onto its own local rank.
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return accelerator


def _model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def load_base_model(
    model_path: str,
    *,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "fp32",
    accelerator: str = "cpu",
    attn_implementation: str | None = "sdpa",
    task: str = "causal_lm",
    revision: str | None = None,
    **model_kwargs: Any,
):
    """Load the frozen base, quantized as asked. Errors from a missing model become one UserError."""
    kwargs: dict[str, Any] = dict(model_kwargs)
    qconfig = quantization_config(quantization, double_quant, compute_dtype)
    if qconfig is not None:
        if task == "classification":
            # The head is trained and saved whole (modules_to_save); transformers' own guess of what to keep
            # out of 4-bit (the last parameter) misses a head that has a bias.
            qconfig.llm_int8_skip_modules = list(CLASSIFIER_HEADS)
        kwargs["quantization_config"] = qconfig
    # Non-quantized parts load in the compute dtype; k-bit preparation upcasts norms/embeddings to fp32.
    kwargs["dtype"] = torch_dtype(compute_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = _model_class(task).from_pretrained(
            model_path, device_map=device_map_for(accelerator), revision=revision, **kwargs
        )
    except OSError as exc:
        raise UserError(f"could not load model {model_path!r}: {str(exc).splitlines()[0]}") from exc
    model.config.use_cache = False
    return model


def attach_lora(
    model, lora: LoraSettings, *, gradient_checkpointing: bool, task: str = "causal_lm", **lora_extra: Any
):
    """Freeze the base, prepare k-bit weights, and add trainable LoRA matrices (all linear layers by default)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    gc_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        for param in model.parameters():
            param.requires_grad = False
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    keep_4bit_weights_differentiable(model)  # an upstream bug: see qlora_lite.compat
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        **lora.extra,
        **lora_extra,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"LoRA target modules {targets!r} do not match this model: {exc}") from exc


def load_classification_base(
    model_path: str,
    *,
    quantization: str,
    double_quant: bool,
    compute_dtype: str,
    accelerator: str,
    attn_implementation: str | None = "sdpa",
    **config_kwargs: Any,
):
    """`load_base_model` for a classifier (the head stays out of 4/8-bit there)."""
    return load_base_model(
        model_path,
        quantization=quantization,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        accelerator=accelerator,
        attn_implementation=attn_implementation,
        task="classification",
        **config_kwargs,
    )


def load_tokenizer(model_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    except OSError as exc:
        raise UserError(
            f"could not load the tokenizer of {model_path!r}: {str(exc).splitlines()[0]}"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_run_record(path: str | os.PathLike) -> dict | None:
    record = Path(path) / RUN_RECORD
    if record.is_file():
        return json.loads(record.read_text())
    return None


def _base_of(adapter, record: dict | None) -> str | None:
    """The base model of an adapter: the recorded path when it exists here, else its Hub id."""
    if record is None:
        return None
    path = record.get("base_model", {}).get("path")
    if path and Path(path).is_dir():
        return path
    from qlora_lite.hub.card import base_hub_id

    hub_id = base_hub_id(record)
    if hub_id:
        return hub_id
    config = Path(adapter) / "adapter_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("base_model_name_or_path") or path
    return path


def load_for_inference(
    adapter: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    quantization: str | None = None,
    compute_dtype: str | None = None,
    accelerator: str | None = None,
    revision: str | None = None,
):
    """Base (+ adapter) in eval mode, quantized as in training unless told otherwise. Returns (model, tokenizer).

    `adapter` is a run folder or a Hub id (with `revision`)."""
    if adapter is not None:
        from qlora_lite.hub.push import resolve_adapter

        adapter = resolve_adapter(adapter, revision)
    record = read_run_record(adapter) if adapter is not None else None
    if record is not None and record.get("task") == "classification":
        raise UserError(f"{adapter} is a classifier: use `qlora-lite classify` or qlora_lite.classify()")
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(
            f"adapter folder {adapter} not found: give a run folder written by `qlora-lite train`"
        )
    base = model or _base_of(adapter, record)
    if base is None:
        raise UserError(f"{adapter}: no run_record.json names the base model; pass --model too")
    plan = (record or {}).get("plan", {})
    accelerator = accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    base_model = load_base_model(
        resolve_model(base),
        quantization=quantization or plan.get("quantization", "nf4"),
        double_quant=plan.get("double_quant", True),
        compute_dtype=compute_dtype or plan.get("compute_dtype", "fp32" if accelerator == "cpu" else "bf16"),
        accelerator=accelerator,
        task=(record or {}).get("task", "causal_lm"),
    )
    tokenizer = load_tokenizer(str(adapter) if record else resolve_model(base))
    if adapter is not None:
        from peft import PeftModel

        base_model = PeftModel.from_pretrained(base_model, str(adapter))
    base_model.config.use_cache = True  # training turns the KV cache off; generation wants it
    base_model.eval()
    return base_model, tokenizer
