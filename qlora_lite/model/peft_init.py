"""PiSSA and LoftQ initialisation on a 4-bit base, and saving adapters whose init changed the base.

Why not PEFT's own: PEFT's PiSSA refuses a quantized weight ("initialize PiSSA under float32 ... then
re-quantize the residual"), and its LoftQ runs on CUDA only and wants the whole base in full precision.
Here both read the original full-precision weights one matrix at a time from the model's safetensors
(as PEFT's `replace_lora_weights_loftq` does) and run on CPU or GPU:

- PiSSA (QPiSSA): A, B = the top-r singular triplets of W (S divided by the LoRA scaling, as PEFT does);
  the 4-bit base becomes Q(W - s*B@A), quantized with the layer's own settings.
- LoftQ: A, B = the top-r singular triplets of W - deq(Q(W)), where Q(W) is the layer's own 4-bit weight; with
  one iteration the base stays exactly as loaded. Each further iteration re-quantizes Q = Q(W - s*B@A) and fits
  A, B to W - deq(Q) again (PEFT's `loftq_init` alternation), which rewrites the 4-bit base: the run then
  keeps that base beside the adapter (model/loftq_base.py).

PiSSA and OLoRA leave W - s*B0@A0 in the base; `save_adapter` converts the trained adapter to a plain LoRA
of rank 2r on the original base (PEFT's documented conversion: A' = [A; A0], B' = [B, -B0]), keeping
DoRA magnitudes and saved heads that PEFT's own conversion drops.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import INITS, PeftSettings

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def peft_init_value(settings: PeftSettings, quantized: bool) -> Any:
    """LoraConfig.init_lora_weights: PEFT's own init, or True when `apply_own_init` does it afterwards."""
    if settings.init == "loftq" or (settings.init == "pissa" and quantized):
        return True
    return INITS[settings.init].peft_value


def _lora_layers(model) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def _weight_reader(model, model_path: str):
    """Reads one original full-precision weight at a time from the base's safetensors."""
    from peft.utils.loftq_utils import _SafetensorLoader

    try:
        return _SafetensorLoader(model, model_path if Path(model_path).is_dir() else None)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise UserError(
            f"{model_path}: PiSSA/LoftQ on a 4-bit base read the original weights from model.safetensors "
            f"({exc}); use a model folder with safetensors weights"
        ) from exc


def _requantize(layer, weight: torch.Tensor) -> None:
    """Put `weight` (fp32) into a bitsandbytes 4-bit layer, quantized with the layer's own settings."""
    old = layer.weight
    new = old.__class__(
        weight.to(old.quant_state.dtype).cpu(),
        requires_grad=False,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        compress_statistics=old.compress_statistics,
        blocksize=old.blocksize,
        module=getattr(old, "module", None),
    ).to(old.device)
    layer.weight = new


def _dequantized(layer) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def _top_r(matrix: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in), B (out x r) with s*B@A = the best rank-r approximation of `matrix`."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


@torch.no_grad()
def apply_own_init(model, settings: PeftSettings, model_path: str, quantization: str) -> None:
    """PiSSA on a quantized base, or LoftQ: set A, B (and the base residual) of every LoRA layer."""
    if settings.init not in ("pissa", "loftq") or (settings.init == "pissa" and quantization == "none"):
        return
    if quantization != "nf4":
        raise UserError(
            f"init_lora_weights={settings.init!r} needs a 4-bit NF4 base (--quantization nf4)"
            + (" or none" if settings.init == "pissa" else ": LoftQ fits the adapter to the 4-bit error")
            + f", not {quantization!r}"
        )
    reader = _weight_reader(model, model_path)
    layers = _lora_layers(model)
    for name, module in layers:
        base = module.get_base_layer()
        if not hasattr(base.weight, "quant_state"):
            continue  # a layer left unquantized (a head): PEFT's default init is kept
        key = name[len("base_model.model.") :] + ".weight"
        weight = reader.get_tensor(key).to(base.weight.device, torch.float32)
        r, scaling = module.r["default"], module.scaling["default"]
        if settings.init == "pissa":
            lora_a, lora_b = _top_r(weight, r, scaling)
            _requantize(base, weight - scaling * (lora_b @ lora_a))
        else:
            lora_a, lora_b = _top_r(weight - _dequantized(base), r, scaling)
            for _ in range(settings.loftq_iter - 1):
                _requantize(base, weight - scaling * (lora_b @ lora_a))
                lora_a, lora_b = _top_r(weight - _dequantized(base), r, scaling)
        module.lora_A["default"].weight.data = lora_a.contiguous().to(module.lora_A["default"].weight.dtype)
        module.lora_B["default"].weight.data = lora_b.contiguous().to(module.lora_B["default"].weight.dtype)
        if "default" in getattr(module, "lora_magnitude_vector", {}):
            # DoRA's magnitude is the column norm of the (new) base + s*B@A, as at PEFT's own init.
            module.lora_magnitude_vector["default"].update_layer(
                base_layer=base,
                lora_A=module.lora_A["default"].weight,
                lora_B=module.lora_B["default"].weight,
                scaling=scaling,
            )
    log.info("%s init: %d LoRA layers initialised from %s", settings.init, len(layers), model_path)


def initial_adapter(model, settings: PeftSettings) -> dict[str, torch.Tensor] | None:
    """The adapter right after an init that changed the base (PiSSA, OLoRA): kept to convert at save time."""
    if not INITS[settings.init].mutates_base or settings.method != "lora":
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model, out: str | Path, initial: dict[str, torch.Tensor] | None) -> None:
    """save_pretrained; after PiSSA/OLoRA the adapter is converted to a plain LoRA on the original base."""
    model.save_pretrained(str(out))
    if initial is None:
        return
    from safetensors.torch import load_file, save_file

    out = Path(out)
    state = load_file(out / ADAPTER_WEIGHTS)
    for key, value in state.items():
        if "lora_A" in key:
            state[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
        elif "lora_B" in key:
            state[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
    save_file(state, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    # Rank doubles; alpha follows so that the scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) is unchanged.
    config["r"] *= 2
    config["lora_alpha"] *= math.sqrt(2) if config.get("use_rslora") else 2
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
