"""Predict peak training memory of LoRA/QLoRA from a model's config.json alone (no weights needed).

The estimate is a sum of named components (bytes), each computed from the config and the knobs:

- base_linear_weights / quant_state: the Linear layers of the decoder/encoder blocks (what bitsandbytes
  quantizes and what LoRA 'all-linear' targets). NF4 stores 0.5 byte/param plus one absmax per 64 weights:
  fp32 (0.5 bit/param) or, with double quantization, 8-bit absmax + an fp32 absmax per 256 blocks
  (0.127 bit/param): double quant saves ~0.373 bit/param.
- other_params: embeddings, lm_head (unless tied), norms and biases; peft's prepare_model_for_kbit_training
  upcasts them to fp32 when the base is quantized.
- lora_params, lora_grads (fp32), optimizer_states (AdamW fp32: 8 B/param; 8-bit: 2 B/param).
- activations: bytes per token per layer, fitted to tracked peaks of real steps on CPU (this package's
  loader: 4-bit base, LoRA all-linear r=16, dropout 0.05, SDPA), in fp32 and in bf16 autocast
  (the residual stream stays fp32 because the norms and embeddings were upcast). With gradient
  checkpointing only each layer's fp32 input is kept, plus one layer recomputed during backward.
- logits_loss: the vocabulary-sized tensors (logits, fp32 upcast, log-softmax and their gradients),
  ~12 B/token/vocab entry, plus a 16-bit copy of the fp32 lm_head under autocast.
- head: the classifier output instead of logits for task='classification'.
- cuda_context: CUDA context + cuBLAS workspace + allocator slack (none on CPU).

See docs/memory.md for the calibration numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import CostTerms, PeftSettings
from qlora_lite.model.peft_methods import shape_targets as lora_targets  # noqa: F401 (re-exported)
from qlora_lite.planner.multi_device import spread

QUANTIZATIONS = ("nf4", "int8", "none")
COMPUTE_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}
ATTENTION = ("sdpa", "eager", "flash_attention_2")
TASKS = ("causal_lm", "classification")
GIB = 1024**3

# CUDA context (~0.3-0.6 GB on current drivers) + cuBLAS workspace + caching-allocator slack.
CUDA_OVERHEAD_BYTES = int(0.6 * GIB)
NF4_BLOCK = 64
NESTED_BLOCK = 256

# Activation bytes per token per layer (llama-like block), fitted by least squares on 20 tracked CPU steps
# each (see docs/memory.md): coefficient x hidden + x intermediate + x kv-dim + constant.
_LAYER_FP32 = (60.4, 20.0, 8.8, 640.0)
_LAYER_16BIT = (45.0, 18.9, 6.9, 212.0)
# GPT-NeoX block (fused qkv, non-gated GELU MLP): fewer LoRA dropouts, no gate.
_NEOX_FP32 = (38.0, 20.0, 0.0, 0.0)
# Bytes per token per vocabulary entry at the loss (log-softmax output, its gradient, the logits gradient),
# measured with the loop dropping the model output before backward (as qlora_lite.loop does); +4 B if kept.
_LOGITS_PER_VOCAB = {4: 12.0, 2: 12.1}
# The chunked loss (training/loss.py): logits of this many elements (positions x vocab) exist at a time;
# bytes per element: fp32 logits + logsumexp's temporary, under 16-bit autocast also the 16-bit logits/softmax.
CHUNK_ELEMENTS = 2**23
_CHUNK_BYTES = {4: 8.0, 2: 12.0}
# precision "upcast": peft's fp32 embeddings, LM head, norms (and so residual stream); "lean": they stay in the
# 16-bit compute dtype, only LoRA is fp32 (model/loading.py). Lean bf16 activations relative to the upcast fit.
PRECISIONS = ("upcast", "lean")
_LEAN_ACTIVATIONS = 0.8
_RECOMPUTE_FACTOR = {
    4: 1.6,
    2: 1.3,
}  # checkpointed backward: peak of one recomputed layer, x layer activations
_DROPOUT_BYTES = {4: 5, 2: 3}  # dropout output + bool mask per input feature of each LoRA target


@dataclass(frozen=True)
class LinearLayer:
    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a config.json."""

    model_type: str
    family: str  # "decoder" | "gpt_neox" | "encoder"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    layer_linears: tuple[LinearLayer, ...]
    source: str = "config"
    extra_embedding_params: int = 0  # position/token-type embeddings of encoders
    norms_per_layer: int = 2
    norm_params: int = 0  # per norm (weight, plus bias for LayerNorm)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    cost: CostTerms | None = None  # the PEFT method's own terms (init work, fixed per-forward work)


def load_config(config: Any) -> tuple[dict, str]:
    """A PretrainedConfig, a dict, a path to a folder/file holding config.json, or a Hub id
    (`org/name[@revision]`, config.json fetched alone) -> (dict, source name)."""
    if isinstance(config, Mapping):
        return dict(config), "config"
    if hasattr(config, "to_dict"):
        return config.to_dict(), f"{type(config).__name__}"
    if hasattr(config, "config_path"):  # a resolved ModelSource (qlora_lite.model.source)
        config = config.config_path
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        if not path.exists():
            from qlora_lite.model.source import looks_like_hub_id, resolve_model_source

            if looks_like_hub_id(str(config)):  # a Hub id: fetch config.json alone (no weights)
                path = resolve_model_source(str(config)).config_path
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{path}: no config.json here; point --model at a Hugging Face model folder")
        try:
            return json.loads(path.read_text()), str(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable JSON config ({exc})") from exc
    raise UserError(
        f"cannot read a model config from {type(config).__name__}: give a folder, a dict or a config"
    )


def _get(cfg: dict, names: Sequence[str]) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def model_shape(config: Any) -> ModelShape:
    """Read the dimensions the memory model needs; UserError naming any missing field and the file."""
    cfg, source = load_config(config)
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    model_type = str(cfg.get("model_type", "")).lower()
    encoder = model_type in {"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "mpnet"}
    neox = model_type == "gpt_neox"
    fields = {
        "hidden_size": ("hidden_size", "dim", "d_model"),
        "intermediate_size": ("intermediate_size", "hidden_dim", "ffn_dim"),
        "num_hidden_layers": ("num_hidden_layers", "n_layers", "num_layers"),
        "num_attention_heads": ("num_attention_heads", "n_heads"),
        "vocab_size": ("vocab_size",),
    }
    values = {key: _get(cfg, names) for key, names in fields.items()}
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise UserError(
            f"{source}: missing {', '.join(missing)} needed to estimate memory "
            f"(model_type {model_type or 'unknown'}); add them to config.json or use a supported architecture"
        )
    h, i = int(values["hidden_size"]), int(values["intermediate_size"])
    layers, heads, vocab = (
        int(values["num_hidden_layers"]),
        int(values["num_attention_heads"]),
        int(values["vocab_size"]),
    )
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    tie = bool(cfg.get("tie_word_embeddings", not neox and not encoder))
    extra_embeddings, norm_params = 0, h
    if encoder:
        family = "encoder"
        linears = (
            LinearLayer("query", h, h, True),
            LinearLayer("key", h, h, True),
            LinearLayer("value", h, h, True),
            LinearLayer("attention.output.dense", h, h, True),
            LinearLayer("intermediate.dense", h, i, True),
            LinearLayer("output.dense", i, h, True),
        )
        extra_embeddings = h * (
            int(cfg.get("max_position_embeddings") or 512) + int(cfg.get("type_vocab_size") or 2)
        )
        norm_params = 2 * h
        tie = True  # no lm_head in a classifier
    elif neox:
        family = "gpt_neox"
        linears = (
            LinearLayer("query_key_value", h, 3 * h, True),
            LinearLayer("dense", h, h, True),
            LinearLayer("dense_h_to_4h", h, i, True),
            LinearLayer("dense_4h_to_h", i, h, True),
        )
        norm_params = 2 * h
    elif model_type == "phi":
        family = "decoder"
        linears = (
            LinearLayer("q_proj", h, q_dim, True),
            LinearLayer("k_proj", h, kv_dim, True),
            LinearLayer("v_proj", h, kv_dim, True),
            LinearLayer("dense", q_dim, h, True),
            LinearLayer("fc1", h, i, True),
            LinearLayer("fc2", i, h, True),
        )
        norm_params = 2 * h
    elif model_type in {"phi3", "phi4"}:
        family = "decoder"
        linears = (
            LinearLayer("qkv_proj", h, q_dim + 2 * kv_dim),
            LinearLayer("o_proj", q_dim, h),
            LinearLayer("gate_up_proj", h, 2 * i),
            LinearLayer("down_proj", i, h),
        )
    else:
        family = "decoder"
        qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        linears = (
            LinearLayer("q_proj", h, q_dim, qkv_bias),
            LinearLayer("k_proj", h, kv_dim, qkv_bias),
            LinearLayer("v_proj", h, kv_dim, qkv_bias),
            LinearLayer("o_proj", q_dim, h, bool(cfg.get("attention_bias", False))),
            LinearLayer("gate_proj", h, i, bool(cfg.get("mlp_bias", False))),
            LinearLayer("up_proj", h, i, bool(cfg.get("mlp_bias", False))),
            LinearLayer("down_proj", i, h, bool(cfg.get("mlp_bias", False))),
        )
    return ModelShape(
        model_type=model_type or "unknown",
        family=family,
        hidden_size=h,
        intermediate_size=i,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("n_positions"),
        layer_linears=linears,
        source=source,
        extra_embedding_params=extra_embeddings,
        norm_params=norm_params,
    )


def count_parameters(
    config: Any, *, task: str = "causal_lm", num_labels: int | None = None
) -> dict[str, int]:
    """Parameters by component: linear (quantizable), embeddings, lm_head, head, norms, biases, total."""
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    h = shape.hidden_size
    linear = shape.num_layers * sum(layer.params for layer in shape.layer_linears)
    biases = shape.num_layers * sum(layer.out_features for layer in shape.layer_linears if layer.bias)
    norms = (shape.num_layers * shape.norms_per_layer + 1) * shape.norm_params
    counts = {
        "linear": linear,
        "embeddings": shape.vocab_size * h + shape.extra_embedding_params,
        "lm_head": 0,
        "head": 0,
        "norms": norms,
        "biases": biases,
    }
    if task == "classification":
        counts["head"] = h * (num_labels or 2) + (h * h + h if shape.family == "encoder" else 0)
    elif not shape.tie_word_embeddings:
        counts["lm_head"] = shape.vocab_size * h
    counts["total"] = sum(counts.values())
    return counts


def _check(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise UserError(f"{name} {value!r} is not one of {', '.join(map(str, allowed))}")


def _layer_activation(
    shape: ModelShape, dbytes: int, targets: Sequence[LinearLayer], dropout: float
) -> float:
    """Bytes per token saved for backward by one block (4-bit base + LoRA all-linear, dropout 0.05)."""
    if shape.family == "gpt_neox":
        a_h, a_i, a_kv, c0 = _NEOX_FP32
        scale = 1.0 if dbytes == 4 else 0.8
        base = scale * (a_h * shape.hidden_size + a_i * shape.intermediate_size + c0)
    else:
        a_h, a_i, a_kv, c0 = _LAYER_FP32 if dbytes == 4 else _LAYER_16BIT
        base = a_h * shape.hidden_size + a_i * shape.intermediate_size + a_kv * shape.kv_dim + c0
    # The fit includes a dropout on the input of every Linear; remove those LoRA does not target.
    per_feature = _DROPOUT_BYTES[dbytes] if dropout > 0 else 0
    fitted = sum(layer.in_features for layer in shape.layer_linears) * _DROPOUT_BYTES[dbytes]
    return max(base - fitted + per_feature * sum(layer.in_features for layer in targets), 0.3 * base)


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk of the chunked loss for a vocabulary (the loss and the planner share it)."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab_size))


def estimate_memory(
    config: Any,
    *,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bf16",
    micro_batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw_torch",
    lora_r: int = 16,
    lora_target_modules: str | Sequence[str] = "all-linear",
    attn_implementation: str = "sdpa",
    device: str = "cuda",
    task: str = "causal_lm",
    num_labels: int | None = None,
    lora_dropout: float = 0.05,
    peft: PeftSettings | dict | None = None,
    world_size: int = 1,
    fsdp: bool = False,
    chunked_loss: bool = False,
    precision: str = "upcast",
) -> MemoryEstimate:
    """Peak bytes of one LoRA/QLoRA training step on one device, by component. Pure: reads only the config.

    `world_size` > 1 is data parallel (each device holds a replica, plus a gradient bucket for the sum);
    with `fsdp` the weights, LoRA, gradients and optimizer states are sharded over the devices instead.
    """
    _check("quantization", quantization, QUANTIZATIONS)
    _check("compute_dtype", compute_dtype, tuple(COMPUTE_DTYPES))
    _check("optimizer", optimizer, tuple(OPTIMIZER_STATE_BYTES))
    _check("attn_implementation", attn_implementation, ATTENTION)
    _check("task", task, TASKS)
    _check("precision", precision, PRECISIONS)
    if micro_batch_size < 1 or seq_len < 1 or lora_r < 1 or world_size < 1:
        raise UserError("micro_batch_size, seq_len, lora_r and world_size must be positive integers")
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    counts = count_parameters(shape, task=task, num_labels=num_labels)
    dbytes = COMPUTE_DTYPES[compute_dtype]
    quantized = quantization != "none"
    lean = quantized and dbytes == 2 and precision == "lean"
    settings = peft if isinstance(peft, PeftSettings) else PeftSettings.from_record(peft)
    settings = replace(settings, r=lora_r, target_modules=lora_target_modules, dropout=lora_dropout)
    method = settings.entry
    targets = lora_targets(shape, lora_target_modules) if method.uses_lora_targets else ()
    cost = method.costs(shape, settings, targets, dbytes)
    seq_len += cost.virtual_tokens  # prompt tuning: every sequence is longer by its virtual tokens
    tokens = micro_batch_size * seq_len
    h, n = shape.hidden_size, shape.num_layers
    notes: list[str] = []

    linear = counts["linear"]
    if quantization == "nf4":
        weights = linear // 2
        blocks = math.ceil(linear / NF4_BLOCK)
        quant_state = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) if double_quant else 4 * blocks
    elif quantization == "int8":
        weights = linear
        quant_state = 4 * n * sum(layer.out_features for layer in shape.layer_linears)
    else:
        weights, quant_state = linear * dbytes, 0
    other = counts["embeddings"] + counts["lm_head"] + counts["norms"] + counts["biases"]
    # FSDP-QLoRA keeps the non-quantized weights in the storage (compute) dtype so they shard with the rest.
    other_bytes = other * (4 if quantized and not fsdp and not lean else dbytes)

    lora = cost.trainable_params
    trainable = lora + counts["head"] * (2 if task == "classification" else 1)  # modules_to_save keeps a copy
    optimizer_bytes = (lora + counts["head"]) * OPTIMIZER_STATE_BYTES[optimizer]

    layer_act = _layer_activation(shape, dbytes, targets, lora_dropout) + cost.activation_per_token_layer
    if lean and compute_dtype == "bf16":  # fp16 keeps the residual stream fp32 (its range is too small)
        layer_act *= _LEAN_ACTIVATIONS
    if attn_implementation == "eager":
        # Softmax output (fp32) per head, plus its 16-bit copy under autocast; and the s x s mask.
        layer_act += shape.num_heads * seq_len * (4 if dbytes == 4 else 6)
        attention_mask = micro_batch_size * seq_len * seq_len
    else:
        attention_mask = 0
    if task == "classification":
        logits = tokens * 4 * h + micro_batch_size * (num_labels or 2) * 16
    elif chunked_loss:
        # training/loss.py: one chunk of logits at a time, plus the gathered hidden states and their gradient.
        chunk = min(tokens, chunk_positions(shape.vocab_size))
        logits = chunk * shape.vocab_size * _CHUNK_BYTES[dbytes] + tokens * h * 8
        if quantized and dbytes == 2 and not lean:
            logits += shape.vocab_size * h * 4  # 16-bit copies of the fp32 head: ours and autocast's
    else:
        logits = tokens * shape.vocab_size * _LOGITS_PER_VOCAB[dbytes]
        if quantized and dbytes == 2 and not lean:
            logits += (
                shape.vocab_size * h * 2
            )  # autocast's 16-bit copy of the fp32 lm_head, kept for backward
    if gradient_checkpointing:
        kept = n * tokens * h * (4 if quantized or dbytes == 4 else dbytes)
        recompute = tokens * layer_act * _RECOMPUTE_FACTOR[dbytes]
        activations = kept + max(0.0, recompute - logits) + attention_mask
    else:
        activations = n * tokens * layer_act + attention_mask
    breakdown = {
        "base_linear_weights": int(weights),
        "quant_state": int(quant_state),
        "other_params": int(other_bytes),
        "lora_params": int(trainable * 4),
        "lora_grads": int((lora + counts["head"]) * 4),
        "optimizer_states": int(optimizer_bytes),
        "activations": int(activations),
        "head" if task == "classification" else "logits_loss": int(logits),
        "cuda_context": CUDA_OVERHEAD_BYTES if device == "cuda" else 0,
        "peft_transient": int(cost.transient_bytes),
    }
    # PiSSA/OLoRA/LoftQ decompose each matrix once at start: that peak counts only if above a step's.
    breakdown["peft_init_excess"] = int(max(0, cost.init_bytes - activations - logits - cost.transient_bytes))
    notes += cost.notes
    if world_size > 1:
        spread(breakdown, shape, targets, lora_r, weights, dbytes, world_size, fsdp)
    if device == "cpu" and dbytes == 2:
        notes.append("16-bit compute on CPU is about 2x slower than fp32 here")
    return MemoryEstimate(
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        params={**counts, "lora": lora},
        notes=tuple(notes),
        cost=cost,
    )
