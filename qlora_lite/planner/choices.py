"""The smaller decisions of a plan and their reasons: sequence length, step time, checkpoint interval, the
nearest plan that fits, and the sentences `Plan.explain()` shows for the memory-driven choices."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.planner.hardware import HardwareProfile, format_bytes
from qlora_lite.planner.memory import ModelShape, chunk_positions, count_parameters, estimate_memory

DEFAULT_SEQ_LEN = 512
MAX_CHECKPOINT_INTERVAL_S = 600
_ROUND_LENGTHS = (
    64,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
    1536,
    2048,
    3072,
    4096,
    6144,
    8192,
    12288,
    16384,
    32768,
)
# Effective LoRA training FLOP/s (crude; 4-bit dequantization included): by compute capability, and per CPU core.
_GPU_FLOPS = {(7, 0): 25e12, (7, 5): 12e12, (8, 0): 90e12, (8, 6): 30e12, (8, 9): 45e12, (9, 0): 180e12}
_CPU_FLOPS_PER_CORE = 4.5e10
_DISK_BYTES_PER_S = {"colab": 40e6, "kaggle": 100e6, "local": 300e6}


def choose_seq_len(lengths: Sequence[int] | None, limit: int | None) -> tuple[int, int, str]:
    """(max_seq_length, examples truncated, why): the smallest round length covering >= 99% of examples."""
    limit = int(limit) if limit else None
    if not lengths:
        value = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
        return value, 0, f"{value}: no data given (default)"
    ordered = sorted(int(n) for n in lengths)
    need = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    value = next((r for r in _ROUND_LENGTHS if r >= need), _ROUND_LENGTHS[-1])
    if limit and value > limit:
        value = limit
    truncated = sum(1 for n in ordered if n > value)
    why = (
        f"covers {len(ordered) - truncated} of {len(ordered)} examples (longest {ordered[-1]}, "
        f"99th percentile {need} tokens); {truncated} truncated"
    )
    if limit and value == limit:
        why += f"; the model's limit is {limit}"
    return value, truncated, why


def step_seconds(
    shape: ModelShape, hw: HardwareProfile, tokens: int, gc: bool, task: str, world_size: int = 1
) -> float:
    """Seconds of one optimizer step of `tokens` tokens spread over `world_size` devices.

    Only the devices the run actually uses count: a machine with 8 GPUs runs a one-process run on one of
    them. CPU ranks share the host's cores, so more CPU processes are no faster.
    """
    params = count_parameters(shape, task=task)["total"]
    flops = (6 if gc else 4) * params * tokens  # forward 2N + backward 2N (input grads only) [+ recompute 2N]
    return flops / _flops_rate(hw, world_size)


def _flops_rate(hw: HardwareProfile, world_size: int = 1) -> float:
    if hw.accelerator == "cuda" and hw.gpus:
        return _GPU_FLOPS.get(tuple(hw.gpus[0].compute_capability), 40e12) * max(1, world_size)
    return _CPU_FLOPS_PER_CORE * max(1, hw.cpu_count)


def peft_method_cost(
    hw: HardwareProfile, est, forwards: int, step_s: float, gc: bool
) -> tuple[float, float, str]:  # noqa: ANN001
    """(extra seconds per step, one-off seconds at start, why) of the PEFT method: DoRA's per-forward
    weight norms, the SVD/QR of PiSSA/OLoRA/LoftQ (decompositions run ~10x below matmul speed)."""
    cost = est.cost
    extra = cost.fixed_flops_per_forward * forwards * (2 if gc else 1) / _flops_rate(hw)
    init = cost.init_flops / (_flops_rate(hw) / 10)
    parts = [f"{format_bytes(est.breakdown['lora_params'])} trainable weights"]
    if extra:
        parts.append(f"step ~{(step_s + extra) / max(step_s, 1e-9):.1f}x plain LoRA's (+{extra:.2f} s)")
    if est.breakdown.get("peft_transient"):
        parts.append(f"+{format_bytes(est.breakdown['peft_transient'])} transient (largest layer)")
    if init:
        parts.append(f"~{init:.0f} s at start (+{format_bytes(cost.init_bytes)} while decomposing)")
    return extra, init, "; ".join(parts + list(cost.notes))


def checkpoint_interval(step_s: float, state_bytes: int, hw: HardwareProfile) -> tuple[int, str]:
    speed = _DISK_BYTES_PER_S.get(hw.environment, 300e6)
    cost = 1.0 + state_bytes / speed
    interval = int(min(MAX_CHECKPOINT_INTERVAL_S, max(60.0, 50 * cost, step_s)))
    why = (
        f"a save (adapter + optimizer, {format_bytes(state_bytes)}) costs ~{cost:.1f} s, one step ~{step_s:.1f} s: "
        f"saving every {interval} s keeps saving under 2% of the time and loses at most "
        f"{min(interval, MAX_CHECKPOINT_INTERVAL_S) / 60:.0f} min"
    )
    return interval, why


def relative_speed(mb: int, seq: int, gc: bool, accelerator: str) -> float:
    """Relative tokens/s: bigger micro-batches use the device better; checkpointing costs ~30%."""
    saturation = 2048 if accelerator == "cuda" else 128
    tokens = mb * seq
    return tokens / (tokens + saturation) * (0.7 if gc else 1.0)


def nearest_fit(search, seq: int, effective: int) -> dict[str, Any] | None:
    """Relax micro-batch, checkpointing and optimizer first; then shorten the sequence length."""
    length = seq
    while length >= 64:
        found = search(True, length)
        if found:
            knobs, est = found
            return {
                **knobs,
                "gradient_accumulation_steps": math.ceil(effective / knobs["micro_batch_size"]),
                "max_seq_length": length,
                "peak_memory_bytes": est.peak_bytes,
            }
        length //= 2
    return None


def explain_choices(reasons, shape, base, seq, knobs, est, target, usable, effective) -> None:  # noqa: ANN001
    gc, mb, opt = knobs["gradient_checkpointing"], knobs["micro_batch_size"], knobs["optimizer"]
    peak = est.peak_bytes
    other_gc = estimate_memory(
        shape, **base, seq_len=seq, micro_batch_size=mb, gradient_checkpointing=not gc, optimizer=opt
    )
    of = f"of {format_bytes(target)} allowed ({format_bytes(usable)} usable)"
    if peak > target:
        reasons["gradient_checkpointing"] = (
            f"{'on' if gc else 'off'}: {format_bytes(peak)} {of}; "
            f"{'off' if gc else 'on'} would need {format_bytes(other_gc.peak_bytes)}"
        )
    elif gc:
        reasons["gradient_checkpointing"] = (
            f"on: {format_bytes(peak)} {of}; off would need {format_bytes(other_gc.peak_bytes)}"
        )
    else:
        reasons["gradient_checkpointing"] = f"off (~30% faster): {format_bytes(peak)} {of} with it off"
    bigger = mb + 1
    if peak > target:
        reasons["micro_batch_size"] = (
            f"{mb} needs {format_bytes(peak)}, more than the {format_bytes(target)} allowed"
        )
    elif bigger <= effective:
        more = estimate_memory(
            shape, **base, seq_len=seq, micro_batch_size=bigger, gradient_checkpointing=gc, optimizer=opt
        )
        reasons["micro_batch_size"] = (
            f"{mb} fits in {format_bytes(peak)}; {bigger} would need {format_bytes(more.peak_bytes)}"
            if more.peak_bytes > target
            else f"{mb}: fastest choice found ({format_bytes(peak)} {of})"
        )
    else:
        reasons["micro_batch_size"] = (
            f"{mb} = the examples per device per step ({effective}): no accumulation needed"
        )
    if opt == "adamw_torch":
        reasons["optimizer"] = (
            f"AdamW fp32 states are small here ({format_bytes(est.breakdown['optimizer_states'])})"
        )
    else:
        reasons["optimizer"] = (
            f"{opt}: 2 bytes/param of state ({format_bytes(est.breakdown['optimizer_states'])})"
        )


FAST_PATHS = ("packing", "chunked_loss")


def explain_fast_paths(reasons, shape, task, chunked_loss, packing, seq, lengths) -> bool:  # noqa: ANN001
    """Why packing and the chunked loss are on or off; returns whether packing is on (default: causal LM)."""
    packing = task == "causal_lm" if packing is None else packing
    if task != "causal_lm":
        if packing or chunked_loss:
            raise UserError("packing and chunked_loss apply to causal language modelling only; turn them off")
        return False
    if packing and lengths:
        tokens, padded = sum(min(int(n), seq) for n in lengths), len(lengths) * seq
        reasons["packing"] = (
            f"on: examples share rows of {seq} tokens (position ids restart per example, no attention "
            f"across them); padding each example to {seq} would waste {100 * (1 - tokens / padded):.0f}%"
        )
    elif packing:
        reasons["packing"] = f"on: examples share rows of {seq} tokens, no attention across examples"
    else:
        reasons["packing"] = "off: one example per row, micro-batches grouped by length"
    if chunked_loss:
        reasons["chunked_loss"] = (
            f"on: the LM head and loss run on supervised positions only, {chunk_positions(shape.vocab_size)} "
            f"at a time; full fp32 logits would take {format_bytes(4 * shape.vocab_size)} per token"
        )
    else:
        reasons["chunked_loss"] = "off: the model's own loss on every position (full fp32 logits)"
    return packing


def default_precision(task: str, quantization: str, compute_dtype: str) -> str:
    """lean for a causal LM on a k-bit base with 16-bit compute (a classifier's trained head must stay fp32;
    at fp32 compute there is nothing to save)."""
    return "lean" if task == "causal_lm" and quantization != "none" and compute_dtype != "fp32" else "upcast"


def explain_precision(reasons, shape, base, seq, knobs, est) -> None:  # noqa: ANN001
    """Which parts are fp32 and why, with the peak of the other choice."""
    dtype, precision = base["compute_dtype"], base["precision"]
    if dtype == "fp32":
        reasons["precision"] = "fp32 compute: every part is fp32 either way"
        return
    if base["quantization"] == "none":
        reasons["precision"] = f"16-bit LoRA: the base stays {dtype}, LoRA weights fp32"
        return
    other = "upcast" if precision == "lean" else "lean"
    alt = estimate_memory(shape, **{**base, "precision": other}, seq_len=seq, **knobs)
    vs = f"peak {format_bytes(est.peak_bytes)}; {other} would need {format_bytes(alt.peak_bytes)}"
    if precision == "upcast":
        reasons["precision"] = (
            f"upcast (peft's default): embeddings, LM head, norms and residual stream fp32; {vs}"
        )
    elif dtype == "fp16":
        reasons["precision"] = (
            f"lean: embeddings and LM head stay fp16, norms and the residual stream fp32 (fp16's range), LoRA "
            f"weights and optimizer state fp32, loss scaled; {vs}"
        )
    else:
        reasons["precision"] = (
            f"lean: embeddings, LM head, norms and the residual stream stay bf16, only LoRA weights and their "
            f"optimizer state are fp32; {vs}"
        )
