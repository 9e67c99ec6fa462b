"""Compatibility report of an adapter: what it is, and whether vLLM's LoRA serving and llama.cpp's LoRA
conversion accept it (and why not), read from its config and tensor names alone (no weights loaded).

The rules are those of vLLM's LoRA loader and llama.cpp's `convert_lora_to_gguf.py` as of 2025: vLLM refuses
DoRA, trained whole modules other than a classifier head, LoRA biases, and ranks above `--max-lora-rank`;
llama.cpp converts only `lora_A`/`lora_B` matrices and scales them by alpha/r (rsLoRA and per-module alphas
would come out wrong).
"""

from __future__ import annotations

import os
from typing import Any

from qlora_lite.inference.adapter_source import read_adapter
from qlora_lite.run_files import ADAPTER_WEIGHTS

VLLM_MAX_RANK = 512  # the largest --max-lora-rank vLLM accepts
VLLM_DEFAULT_MAX_RANK = 16  # what it serves without --max-lora-rank
HEADS = ("score", "classifier")


def tensor_names(folder: Any) -> list[str]:
    """The tensor names in the adapter's safetensors file (header only)."""
    from safetensors import safe_open

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _vllm(facts: dict[str, Any], names: list[str]) -> dict[str, Any]:
    reasons, notes = [], []
    if facts["peft_type"] != "LORA":
        reasons.append(f"it is a {facts['peft_type']} adapter; vLLM serves LoRA only")
    if facts["use_dora"]:
        reasons.append("DoRA adapters are not supported by vLLM")
    saved = [m for m in facts["modules_to_save"] or [] if m not in HEADS]
    if saved:
        reasons.append(f"whole trained modules {saved} (modules_to_save) are not loaded by vLLM")
    if facts["bias"] != "none" or any(n.endswith("lora_B.bias") for n in names):
        reasons.append("LoRA bias terms are not supported by vLLM")
    ranks = [facts["rank"] or 0, *(facts["rank_pattern"] or {}).values()]
    if max(ranks) > VLLM_MAX_RANK:
        reasons.append(f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK})")
    elif max(ranks) > VLLM_DEFAULT_MAX_RANK:
        notes.append(f"rank {max(ranks)}: start vLLM with --max-lora-rank {max(ranks)} or more (default 16)")
    if any("lora_embedding" in n for n in names):
        notes.append("LoRA on embeddings needs --lora-extra-vocab-size support in your vLLM version")
    if facts["task"] == "classification":
        notes.append("a classifier: vLLM serves it only through its pooling/classification runner")
    if facts.get("own_base"):
        notes.append(
            f"serve it on the 4-bit base LoftQ rewrote: vllm serve {facts['own_base']} --quantization "
            "bitsandbytes --enable-lora (on the original base its outputs are wrong)"
        )
    return {"ok": not reasons, "reasons": reasons, "notes": notes}


def _llama_cpp(facts: dict[str, Any], names: list[str]) -> dict[str, Any]:
    reasons, notes = [], []
    if facts["peft_type"] != "LORA":
        reasons.append(f"it is a {facts['peft_type']} adapter; convert_lora_to_gguf.py converts LoRA only")
    other = sorted({n for n in names if "lora_A" not in n and "lora_B" not in n})
    if facts["use_dora"] or any("lora_magnitude_vector" in n for n in names):
        reasons.append("DoRA magnitude vectors are not converted")
    elif other:
        reasons.append(f"{len(other)} tensors besides lora_A/lora_B (e.g. {other[0]}) are not converted")
    if facts["use_rslora"]:
        reasons.append(
            "rsLoRA scaling (alpha/sqrt(r)) is ignored: the converted adapter would be scaled as alpha/r"
        )
    if facts["rank_pattern"] or facts["alpha_pattern"]:
        reasons.append("per-module ranks/alphas (rank_pattern, alpha_pattern) are ignored by the converter")
    if facts["task"] == "classification":
        reasons.append("a classifier head cannot be converted; llama.cpp LoRA is for generation")
    if facts.get("own_base"):
        reasons.append(
            "it belongs to the 4-bit base LoftQ rewrote, which convert_hf_to_gguf.py cannot read (bitsandbytes "
            "weights): merge it (qlora-lite merge) and convert the merged model instead"
        )
    if not reasons:
        notes.append("convert with llama.cpp's convert_lora_to_gguf.py --base <base model folder>")
    return {"ok": not reasons, "reasons": reasons, "notes": notes}


def adapter_report(path_or_id: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """Rank, targets, modules_to_save, DoRA/rsLoRA, size, and the vLLM / llama.cpp verdicts with reasons."""
    source = read_adapter(path_or_id, revision)
    facts = source.summary()
    names = tensor_names(source.folder)
    facts["tensors"] = len(names)
    return {**facts, "vllm": _vllm(facts, names), "llama_cpp": _llama_cpp(facts, names)}


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned lines for a terminal."""
    size = report.get("size_bytes")
    rows = [
        ("adapter", report["source"]),
        ("task", report["task"]),
        ("base", report.get("base") or "unknown"),
        ("type", report.get("peft_type")),
        ("rank / alpha", f"{report.get('rank')} / {report.get('alpha')}"),
        ("targets", _targets(report.get("targets"))),
        ("modules_to_save", ", ".join(report.get("modules_to_save") or []) or "none"),
        (
            "DoRA / rsLoRA",
            f"{'yes' if report['use_dora'] else 'no'} / {'yes' if report['use_rslora'] else 'no'}",
        ),
        ("rank_pattern", str(report.get("rank_pattern") or "none")),
        ("trained on", report.get("quantization") or "unknown"),
        ("own base", report.get("own_base") or "no (the original base)"),
        ("size", f"{size / 2**20:.2f} MiB in {report['tensors']} tensors" if size else "unknown"),
    ]
    for key, label in (("vllm", "vLLM"), ("llama_cpp", "llama.cpp")):
        verdict = report[key]
        text = "accepted" if verdict["ok"] else "refused: " + "; ".join(verdict["reasons"])
        rows.append((label, text))
        rows.extend(("", f"note: {n}") for n in verdict["notes"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _targets(targets: Any) -> str:
    if isinstance(targets, list):
        short = sorted({t.rsplit(".", 1)[-1] for t in targets})
        return ", ".join(short) + (f" ({len(targets)} modules)" if len(targets) > len(short) else "")
    return str(targets)
