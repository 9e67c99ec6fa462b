"""Choose every training knob so that the run fits in memory and runs as fast as it can: `plan(...)`.

A pure function of (model config, data lengths, hardware profile, user overrides). Knobs the user fixes stay
fixed; the planner fills the rest from `memory.estimate_memory` and explains each choice with numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.options import BY_NAME, PLANNER_KNOBS, problems
from qlora_lite.planner.choices import (  # noqa: F401 (choose_seq_len re-exported)
    DEFAULT_SEQ_LEN,
    FAST_PATHS,
    MAX_CHECKPOINT_INTERVAL_S,
    checkpoint_interval,
    choose_seq_len,
    default_precision,
    explain_choices,
    explain_fast_paths,
    explain_precision,
    nearest_fit,
    peft_method_cost,
    relative_speed,
    step_seconds,
)
from qlora_lite.planner.hardware import HardwareProfile, format_bytes
from qlora_lite.planner.memory import TASKS, ModelShape, estimate_memory, model_shape
from qlora_lite.planner.profiles import profile_with_budget, resolve_hardware

DEFAULT_EFFECTIVE_BATCH = 16
# Fraction of usable memory a plan may fill: the allocator fragments on CUDA; the estimate is +-5% on CPU.
HEADROOM = {"cuda": 0.95, "cpu": 0.90, "mps": 0.85}

# The knobs plan() accepts: the options declared `planner=True` (qlora_lite.options), plus inputs that are not
# options themselves: the task's head, the PEFT method (a PeftSettings made from the PEFT options), and how
# many processes train together (torchrun decides it).
INPUT_KNOBS = ("task", "num_labels", "peft", "world_size", "fsdp")
KNOBS = (*PLANNER_KNOBS, *INPUT_KNOBS)


@dataclass(frozen=True)
class Plan:
    hardware_name: str
    accelerator: str
    quantization: str
    double_quant: bool
    compute_dtype: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    max_seq_length: int
    gradient_checkpointing: bool
    optimizer: str
    attn_implementation: str
    lora_r: int
    lora_target_modules: str | tuple[str, ...]
    task: str
    checkpoint_every_seconds: int
    peak_memory_bytes: int
    usable_memory_bytes: int
    breakdown: dict[str, int]
    fits: bool
    truncated_examples: int = 0
    num_examples: int | None = None
    estimated_step_seconds: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)
    fixed: tuple[str, ...] = ()
    nearest_fit: dict[str, Any] | None = None
    message: str = ""
    num_labels: int | None = None
    peft: dict[str, Any] = field(default_factory=lambda: PeftSettings().to_record())
    estimated_init_seconds: float = 0.0
    world_size: int = 1
    fsdp: bool = False
    packing: bool = False  # causal LM: several examples per row of max_seq_length tokens
    chunked_loss: bool = False  # causal LM: the loss in chunks on supervised positions
    precision: str = "upcast"  # "lean": frozen non-quantized parts stay in the 16-bit compute dtype
    shape: ModelShape | None = field(default=None, repr=False, compare=False)

    def _estimate(self, **changes: Any):
        knobs = {**self._estimate_knobs(), **changes}
        return estimate_memory(self.shape, **knobs)

    def _estimate_knobs(self) -> dict[str, Any]:
        return dict(
            quantization=self.quantization,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            micro_batch_size=self.micro_batch_size,
            seq_len=self.max_seq_length,
            gradient_checkpointing=self.gradient_checkpointing,
            optimizer=self.optimizer,
            lora_r=self.lora_r,
            lora_target_modules=self.lora_target_modules,
            attn_implementation=self.attn_implementation,
            device="cuda" if self.accelerator == "cuda" else "cpu",
            task=self.task,
            num_labels=self.num_labels,
            peft=self.peft,
            world_size=self.world_size,
            fsdp=self.fsdp,
            chunked_loss=self.chunked_loss,
            precision=self.precision,
        )

    def with_micro_batch(self, n: int) -> Plan:
        """The same plan at micro-batch `n` (OOM backoff): accumulation = ceil(per-device examples / n)."""
        if n < 1:
            raise ValueError("micro-batch size must be >= 1")
        estimate = self._estimate(micro_batch_size=n) if self.shape is not None else None
        peak = estimate.peak_bytes if estimate else self.peak_memory_bytes
        return replace(
            self,
            micro_batch_size=n,
            gradient_accumulation_steps=math.ceil(math.ceil(self.effective_batch_size / self.world_size) / n),
            peak_memory_bytes=peak,
            breakdown=dict(estimate.breakdown) if estimate else self.breakdown,
            fits=peak <= self.usable_memory_bytes,
            reasons={**self.reasons, "micro_batch_size": f"lowered to {n} after running out of memory"},
        )

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "peak_memory_bytes usable_memory_bytes breakdown quantization double_quant compute_dtype micro_batch_size "
            "gradient_accumulation_steps effective_batch_size max_seq_length gradient_checkpointing optimizer "
            "attn_implementation lora_r task checkpoint_every_seconds fits truncated_examples num_examples "
            "estimated_step_seconds estimated_init_seconds reasons fixed nearest_fit message accelerator world_size fsdp peft packing chunked_loss precision"
        ).split()
        data = {key: getattr(self, key) for key in keys}
        data["hardware"] = self.hardware_name
        data["lora_target_modules"] = (
            self.lora_target_modules
            if isinstance(self.lora_target_modules, str)
            else list(self.lora_target_modules)
        )
        data["fixed"] = list(self.fixed)
        data["breakdown"] = dict(self.breakdown)
        return data

    def explain(self) -> str:
        """A table: each knob, its value, and why (with numbers); then the memory breakdown."""
        status = "fits" if self.fits else "DOES NOT FIT"
        lines = [
            f"plan for {self.hardware_name} ({self.accelerator}): peak {format_bytes(self.peak_memory_bytes)} "
            f"of {format_bytes(self.usable_memory_bytes)} usable -> {status}",
        ]
        if self.message:
            lines.append(self.message)
        rows = [
            (
                "quantization",
                self.quantization
                + (" + double quant" if self.double_quant and self.quantization == "nf4" else ""),
            ),
            ("compute_dtype", self.compute_dtype),
            ("max_seq_length", str(self.max_seq_length)),
            ("micro_batch_size", str(self.micro_batch_size)),
            ("gradient_accumulation_steps", str(self.gradient_accumulation_steps)),
            ("effective_batch_size", str(self.effective_batch_size)),
            *(
                [("world_size", f"{self.world_size}" + (" (FSDP)" if self.fsdp else ""))]
                if self.world_size > 1
                else []
            ),  # fmt: skip
            ("gradient_checkpointing", "on" if self.gradient_checkpointing else "off"),
            ("optimizer", self.optimizer),
            ("precision", self.precision),
            *[(k, "on" if getattr(self, k) else "off") for k in FAST_PATHS if self.task == "causal_lm"],
            ("checkpoint_every_seconds", str(self.checkpoint_every_seconds)),
            ("peft_method", self.peft.get("description", self.peft.get("method", "lora"))),
        ]
        width = max(len(name) for name, _ in rows)
        vwidth = max(len(value) for _, value in rows)
        lines.append(f"{'knob':<{width}}  {'value':<{vwidth}}  why")
        for name, value in rows:
            why = self.reasons.get(name, "")
            if name in self.fixed:
                why = "fixed by you" + (f"; {why}" if why else "")
            lines.append(f"{name:<{width}}  {value:<{vwidth}}  {why}")
        lines.append("memory at the peak:")
        for name, value in self.breakdown.items():
            if value:
                lines.append(f"  {name:<22} {format_bytes(value):>10}")
        if self.nearest_fit:
            lines.append(
                "nearest plan that fits: " + ", ".join(f"{k}={v}" for k, v in self.nearest_fit.items())
            )
        return "\n".join(lines)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _validate(fixed: dict[str, Any]) -> None:
    for key in fixed:
        if key not in KNOBS:
            raise UserError(f"unknown planning knob {key!r}: known knobs are {', '.join(KNOBS)}")
    problem = problems({k: v for k, v in fixed.items() if k in BY_NAME})
    if fixed.get("task", "causal_lm") not in TASKS:
        problem.append(f"task must be one of {', '.join(TASKS)} (got {fixed['task']!r})")
    for key in ("num_labels", "world_size"):
        if fixed.get(key) is not None and not _positive_int(fixed[key]):
            problem.append(f"{key} must be a positive integer (got {fixed[key]!r})")
    if fixed.get("fsdp") not in (None, True, False):
        problem.append(f"fsdp must be True or False (got {fixed['fsdp']!r})")
    if problem:
        raise UserError("; ".join(problem))


def plan(
    model: Any, data: Sequence[int] | None = None, hardware: HardwareProfile | str | None = None, **fixed: Any
) -> Plan:
    """Fill every knob the user did not fix so that the run fits `hardware` (None: this machine).

    The entry point for users: `hardware` may be a profile name or None (detect); everything after that is
    `make_plan`, a pure function of the model, a hardware profile, the data lengths and the fixed knobs.
    """
    return make_plan(model, data, resolve_hardware(hardware), **fixed)


def make_plan(model: Any, data: Sequence[int] | None, hardware: HardwareProfile, **fixed: Any) -> Plan:
    """`plan()` for a resolved hardware profile: reads the model's config.json, touches nothing else."""
    _validate(fixed)
    peft = PeftSettings.checked(fixed.get("peft"))
    shape = (
        model
        if isinstance(model, ModelShape)
        else model_shape(os.fspath(model) if isinstance(model, os.PathLike) else model)
    )
    if not isinstance(hardware, HardwareProfile):
        raise TypeError(f"make_plan needs a HardwareProfile (resolve_hardware makes one), got {hardware!r}")
    hw = (
        profile_with_budget(fixed["max_memory"], hardware)
        if fixed.get("max_memory") is not None
        else hardware
    )
    device = "cuda" if hw.accelerator == "cuda" else "cpu"
    usable = hw.usable_memory_bytes
    target = int(usable * HEADROOM.get(hw.accelerator, 0.9))
    reasons: dict[str, str] = {}
    task = fixed.get("task", "causal_lm")
    world_size, fsdp = fixed.get("world_size", 1), fixed.get("fsdp", False)

    quantization = fixed.get("quantization", "nf4")
    reasons["quantization"] = (
        "QLoRA: 4-bit NF4 base weights (0.5 byte/param)" if quantization == "nf4" else ""
    )
    if "compute_dtype" in fixed:
        dtype = fixed["compute_dtype"]
    elif hw.accelerator == "cuda":
        dtype = "bf16" if hw.native_bf16 else "fp16"
        cc = hw.gpus[0].compute_capability if hw.gpus else (0, 0)
        reasons["compute_dtype"] = (
            f"compute capability {cc[0]}.{cc[1]} has native bf16"
            if dtype == "bf16"
            else f"compute capability {cc[0]}.{cc[1]} < 8.0 has no native bf16"
        )
    else:
        dtype = "fp32"
        reasons["compute_dtype"] = "on CPU fp32 is ~2x faster than bf16 (bitsandbytes dequantizes per matmul)"

    if "max_seq_length" in fixed:
        seq = fixed["max_seq_length"]
        truncated = sum(1 for n in data if n > seq) if data else 0
        reasons["max_seq_length"] = f"{truncated} of {len(data)} examples truncated" if data else ""
    else:
        seq, truncated, reasons["max_seq_length"] = choose_seq_len(data, shape.max_position_embeddings)

    mb_fixed, ga_fixed = fixed.get("micro_batch_size"), fixed.get("gradient_accumulation_steps")
    effective = fixed.get("effective_batch_size")
    if mb_fixed and ga_fixed:
        if effective and effective != mb_fixed * ga_fixed:
            raise UserError(
                f"effective batch {effective} != micro-batch {mb_fixed} x accumulation {ga_fixed}: fix at most two"
            )
        effective = mb_fixed * ga_fixed * world_size
    effective = effective or DEFAULT_EFFECTIVE_BATCH
    per_device = math.ceil(effective / world_size)  # each step's examples are split over the processes

    base = dict(
        quantization=quantization,
        double_quant=fixed.get("double_quant", True),
        compute_dtype=dtype,
        lora_r=fixed.get("lora_r", 16),
        lora_target_modules=fixed.get("lora_target_modules", "all-linear"),
        attn_implementation=fixed.get("attn_implementation", "sdpa"),
        device=device,
        task=task,
        num_labels=fixed.get("num_labels"),
        peft=peft,
        world_size=world_size,
        fsdp=fsdp,
        chunked_loss=fixed.get("chunked_loss", task == "causal_lm"),
        precision=fixed.get("precision", default_precision(task, quantization, dtype)),
    )
    packing = explain_fast_paths(reasons, shape, task, base["chunked_loss"], fixed.get("packing"), seq, data)

    method_cost = estimate_memory(shape, **base, micro_batch_size=1, seq_len=seq).cost
    if not method_cost.gradient_checkpointing and fixed.get("gradient_checkpointing"):
        raise UserError(
            f"{peft.describe()} cannot run with gradient checkpointing: drop --gradient-checkpointing on"
        )

    def micro_batches(free_all: bool) -> list[int]:
        if mb_fixed and not free_all:
            return [mb_fixed]
        top = per_device
        if ga_fixed and not free_all:
            top = max(1, per_device // ga_fixed)
        # Every size, not just powers of two: the loop runs a step's examples as micro-batches of any size
        # (e.g. 8 as 3+3+2) with the same update, so the largest size that fits can be used.
        return list(range(1, top + 1))

    def search(free_all: bool, seq_len: int) -> tuple[dict, Any] | None:
        gcs = (
            [fixed["gradient_checkpointing"]]
            if "gradient_checkpointing" in fixed and not free_all
            else [False, True]
        )
        if not method_cost.gradient_checkpointing:
            gcs = [False]  # e.g. prefix tuning: PEFT refuses checkpointing
        if "optimizer" in fixed and not free_all:
            optimizers = [fixed["optimizer"]]
        else:
            optimizers = ["adamw_torch"] + (["paged_adamw_8bit"] if device == "cuda" else [])
        best = None
        for opt in optimizers:
            for gc in gcs:
                for mb in micro_batches(free_all):
                    est = estimate_memory(
                        shape,
                        **base,
                        micro_batch_size=mb,
                        seq_len=seq_len,
                        gradient_checkpointing=gc,
                        optimizer=opt,
                    )
                    if est.peak_bytes > target:
                        continue
                    score = (relative_speed(mb, seq_len, gc, device), opt == "adamw_torch", -est.peak_bytes)
                    if best is None or score > best[0]:
                        best = (
                            score,
                            dict(micro_batch_size=mb, gradient_checkpointing=gc, optimizer=opt),
                            est,
                        )
        return (best[1], best[2]) if best else None

    found = search(False, seq)
    nearest, message = None, ""
    if found:
        knobs, est = found
    else:
        knobs = dict(
            micro_batch_size=mb_fixed or 1,
            gradient_checkpointing=fixed.get("gradient_checkpointing", method_cost.gradient_checkpointing),
            optimizer=fixed.get("optimizer", "paged_adamw_8bit" if device == "cuda" else "adamw_torch"),
        )
        est = estimate_memory(shape, **base, seq_len=seq, **knobs)
        nearest = nearest_fit(search, seq, per_device)
        smallest = estimate_memory(
            shape, **base, micro_batch_size=1, seq_len=seq, gradient_checkpointing=method_cost.gradient_checkpointing,
            optimizer="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
        ).peak_bytes  # fmt: skip
        message = (
            f"does not fit: {format_bytes(est.peak_bytes)} needed, {format_bytes(target)} available "
            f"({format_bytes(usable)} usable). The smallest configuration at max_seq_length {seq} "
            f"(micro-batch 1, checkpointing on) needs {format_bytes(smallest / HEADROOM.get(hw.accelerator, 0.9))}"
            f" of usable memory."
        )
    mb = knobs["micro_batch_size"]
    accumulation = ga_fixed if ga_fixed and mb_fixed else math.ceil(per_device / mb)
    ranks = f" x {world_size} processes" if world_size > 1 else ""
    if per_device % mb:
        reasons["gradient_accumulation_steps"] = (
            f"effective batch {effective} is not a multiple of micro-batch {mb}{ranks}: each step still takes "
            f"{effective} examples, as {accumulation} micro-batches per device ({mb} x {accumulation - 1} + {per_device - mb * (accumulation - 1)})"
        )
    else:
        reasons["gradient_accumulation_steps"] = (
            f"{mb} x {accumulation}{ranks} keeps the effective batch at {effective}"
        )
    if "effective_batch_size" in fixed:
        reasons["effective_batch_size"] = ""  # explain() already says "fixed by you"
    elif mb_fixed and ga_fixed:
        reasons["effective_batch_size"] = f"your micro-batch {mb_fixed} x accumulation {ga_fixed}"
    else:
        reasons["effective_batch_size"] = f"default {effective}"
    explain_choices(reasons, shape, base, seq, knobs, est, target, usable, per_device)
    explain_precision(reasons, shape, base, seq, knobs, est)

    step_s = step_seconds(
        shape, hw, mb * accumulation * seq * world_size, knobs["gradient_checkpointing"], task, world_size
    )
    extra_s, init_s, reasons["peft_method"] = peft_method_cost(
        hw, est, accumulation, step_s, knobs["gradient_checkpointing"]
    )
    step_s += extra_s
    state_bytes = est.breakdown["lora_params"] + est.breakdown["optimizer_states"]
    interval, reasons["checkpoint_every_seconds"] = checkpoint_interval(step_s, state_bytes, hw)
    names = tuple(k for k in fixed if k not in ("max_memory", "world_size", "peft"))
    return Plan(
        hardware_name=hw.name,
        accelerator=hw.accelerator,
        quantization=quantization,
        double_quant=base["double_quant"],
        compute_dtype=dtype,
        micro_batch_size=mb,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=effective,
        max_seq_length=seq,
        gradient_checkpointing=knobs["gradient_checkpointing"],
        optimizer=knobs["optimizer"],
        attn_implementation=base["attn_implementation"],
        lora_r=base["lora_r"],
        lora_target_modules=base["lora_target_modules"]
        if isinstance(base["lora_target_modules"], str)
        else tuple(base["lora_target_modules"]),
        task=task,
        checkpoint_every_seconds=interval,
        peak_memory_bytes=est.peak_bytes,
        usable_memory_bytes=usable,
        breakdown=dict(est.breakdown),
        fits=found is not None,
        truncated_examples=truncated,
        num_examples=len(data) if data is not None else None,
        estimated_step_seconds=round(step_s, 3),
        reasons=reasons,
        fixed=names,
        nearest_fit=nearest,
        message=message,
        num_labels=base["num_labels"],
        peft=replace(peft, r=base["lora_r"], target_modules=base["lora_target_modules"]).to_record(),
        estimated_init_seconds=round(init_s, 3),
        world_size=world_size,
        fsdp=fsdp,
        packing=packing,
        chunked_loss=base["chunked_loss"],
        precision=base["precision"],
        shape=shape,
    )
