"""Load a base model (4-bit NF4, 8-bit or 16/32-bit) and attach LoRA; load base + adapter for inference."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from qlora_lite.compat import keep_4bit_weights_differentiable
from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings, module_targets
from qlora_lite.model.source import ModelSource, resolve_model_source
from qlora_lite.run_files import GENERATION_CONFIG, RUN_RECORD

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZATIONS = ("nf4", "int8", "none")
CLASSIFIER_HEADS = ("score", "classifier")  # the head of decoder / encoder *ForSequenceClassification models


LoraSettings = PeftSettings  # the name before the PEFT-method registry (keywords unchanged)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"compute dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def resolve_model(model: str | os.PathLike) -> str:
    """A local folder with config.json, or a Hub id (checked on the Hub, config.json fetched): what
    `from_pretrained` takes. `resolve_model_source` also gives the commit to pin."""
    return resolve_model_source(model).name


WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.gguf",
    "*.safetensors.index.json",
    "*.bin.index.json",
)


def check_has_weights(model_path: str) -> None:
    """A local model folder must hold weights to train (a config.json alone is enough to plan, not to train)."""
    path = Path(model_path)
    if path.is_dir() and not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UserError(
            f"model folder {path} has a config.json but no weights (model.safetensors or pytorch_model.bin): "
            "download the whole model into it (e.g. `hf download <repo> --local-dir "
            f"{path}`) or give its Hub id"
        )


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
    if qconfig is not None and _saved_quantized(model_path):
        qconfig = None  # a folder saved in 4-bit (a LoftQ run's base) loads with its own quantization config
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
    # Every base runs bitsandbytes' training kernel, in training and inference alike: its CPU inference
    # repacking breaks LoRA gradients and DoRA norms and is not exactly undone (see qlora_lite.compat).
    keep_4bit_weights_differentiable(model)
    return model


def _saved_quantized(model_path: str) -> bool:
    config = Path(model_path) / "config.json"
    try:
        return config.is_file() and "quantization_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def attach_lora(
    model,
    settings: PeftSettings,
    *,
    gradient_checkpointing: bool,
    task: str = "causal_lm",
    model_path: str | None = None,
    quantization: str = "nf4",
    modules_to_save: list[str] | None = None,
    precision: str = "upcast",
    own_init: bool = True,
):
    """Freeze the base, prepare k-bit weights, and attach the PEFT method of `settings` (LoRA by default).

    PiSSA/LoftQ on a 4-bit base read the original weights from `model_path` (see model/peft_init.py);
    `own_init=False` skips that work (a resume whose checkpoint and saved base replace it).
    precision "upcast": peft's `prepare_model_for_kbit_training` (embeddings, LM head and norms cast to fp32,
    so the residual stream runs in fp32). "lean": the frozen non-quantized parts stay in the compute dtype;
    only the PEFT weights (and so their gradients and optimizer state) are fp32. With fp16 the norms and the
    residual stream stay fp32 (fp16's range is too small for them); the loop adds a loss scaler."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from qlora_lite.model.peft_init import apply_own_init, initial_adapter, peft_init_value

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    gc_kwargs = {"use_reentrant": False}
    if precision not in ("upcast", "lean"):
        raise UserError(f"precision {precision!r} is not one of upcast, lean")
    if quantized and precision == "upcast":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        for param in model.parameters():
            param.requires_grad = False
        if quantized:
            _keep_fp16_stable(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    method = settings.entry
    targets = module_targets(model, settings.target_modules) if method.uses_lora_targets else None
    config = method.peft_config(
        settings,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        targets=targets,
        modules_to_save=modules_to_save,
    )
    if method.peft_type == "LORA":
        config.init_lora_weights = peft_init_value(settings, quantized)
    if method.peft_type == "PREFIX_TUNING" and task == "classification" and not _takes_past_key_values(model):
        # PEFT's sequence-classification wrapper finds out only at the first forward (a ValueError mid-run).
        raise UserError(
            f"prefix tuning of a classifier needs a model that takes past_key_values; {model.config.model_type} "
            "does not here: use --peft-method prompt_tuning or lora"
        )
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"{settings.describe()} cannot be attached to this model (targets {targets!r}): {exc}"
        ) from exc
    if method.peft_type == "LORA" and own_init:
        apply_own_init(peft_model, settings, model_path or "", quantization if quantized else "none")
    # PiSSA/OLoRA changed the base: keep the initial adapter to save a plain LoRA on the original base.
    peft_model.qlora_lite_initial_adapter = initial_adapter(peft_model, settings)
    return peft_model


def _keep_fp16_stable(model) -> None:  # noqa: ANN001
    """fp16 only: norms (tiny) in fp32, and the embeddings' output cast to fp32 so the residual stream is fp32;
    the large embedding and LM head matrices stay fp16."""
    params = [p for p in model.parameters() if p.__class__.__name__ != "Params4bit"]
    if not any(p.dtype == torch.float16 for p in params):
        return
    for param in params:
        if param.dtype == torch.float16 and param.dim() == 1:
            param.data = param.data.float()
    model.get_input_embeddings().register_forward_hook(lambda _module, _args, output: output.float())


def load_classification_base(
    model_path: str,
    *,
    quantization: str,
    double_quant: bool,
    compute_dtype: str,
    accelerator: str,
    attn_implementation: str | None = "sdpa",
    revision: str | None = None,
    **config_kwargs: Any,
):
    """`load_base_model` for a classifier (the head stays out of 4/8-bit there)."""
    return load_base_model(
        model_path,
        revision=revision,
        quantization=quantization,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        accelerator=accelerator,
        attn_implementation=attn_implementation,
        task="classification",
        **config_kwargs,
    )


def _takes_past_key_values(model) -> bool:  # noqa: ANN001
    """What PEFT's prefix tuning of a classifier checks at forward time: the model or its backbone takes
    past_key_values (transformers 5 decoders call it `cache`, so PEFT refuses them too)."""
    import inspect

    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return any(
        module is not None and "past_key_values" in inspect.signature(module.forward).parameters
        for module in (model, backbone)
    )


def load_tokenizer(model: str | ModelSource, revision: str | None = None):
    """The tokenizer of a folder, a Hub id (at `revision`) or a resolved `ModelSource` (at its commit)."""
    from transformers import AutoTokenizer

    if isinstance(model, ModelSource):
        model, revision = model.name, revision or model.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except OSError as exc:
        raise UserError(f"could not load the tokenizer of {model!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_run_record(path: str | os.PathLike) -> dict | None:
    record = Path(path) / RUN_RECORD
    if record.is_file():
        return json.loads(record.read_text())
    return None


def base_model_of(adapter, record: dict | None) -> str | None:
    """The base model of an adapter: the recorded path when it exists here, else its Hub id pinned to the
    recorded commit (`org/name@sha`)."""
    if record is None:
        return None
    own = record.get("loftq_base")
    if own:  # LoftQ rewrote the 4-bit base: the adapter is right only on the base saved beside it
        folder = Path(adapter) / own["folder"]
        if not folder.is_dir():
            raise UserError(
                f"{adapter} was trained on its own 4-bit base (LoftQ with more than one iteration) and {folder} "
                "is missing: copy the whole run folder, or download the whole Hub repo"
            )
        return str(folder)
    base = record.get("base_model", {})
    path = base.get("path")
    if path and Path(path).is_dir():
        return path
    from qlora_lite.hub.card import base_hub_id

    hub_id = base_hub_id(record)
    if hub_id:
        revision = base.get("revision") or ""
        return f"{hub_id}@{revision}" if revision and not revision.startswith("local-") else hub_id
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
    base = model or base_model_of(adapter, record)
    if base is None:
        raise UserError(f"{adapter}: no run_record.json names the base model; pass --model too")
    plan = (record or {}).get("plan", {})
    accelerator = accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model_source(base)
    base_model = load_base_model(
        source.name,
        revision=source.revision,
        quantization=quantization or plan.get("quantization", "nf4"),
        double_quant=plan.get("double_quant", True),
        compute_dtype=compute_dtype or plan.get("compute_dtype", "fp32" if accelerator == "cpu" else "bf16"),
        accelerator=accelerator,
        task=(record or {}).get("task", "causal_lm"),
    )
    tokenizer = load_tokenizer(str(adapter) if record else source)
    if adapter is not None:
        from peft import PeftModel

        base_model = PeftModel.from_pretrained(base_model, str(adapter))
        if (Path(adapter) / GENERATION_CONFIG).is_file():  # the run's stop tokens (see data.templates)
            from transformers import GenerationConfig

            base_model.generation_config = GenerationConfig.from_pretrained(str(adapter))
    base_model.config.use_cache = True  # training turns the KV cache off; generation wants it
    base_model.eval()
    return base_model, tokenizer
