"""Lean precision (frozen parts in the compute dtype, LoRA fp32) against peft's fp32 upcast, on a tiny model."""

from __future__ import annotations

import random

import torch

from qlora_lite.data.encoding import Example
from qlora_lite.model.loading import attach_lora, load_base_model
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.planner.planning import plan
from qlora_lite.training.fastpath import FastPaths
from qlora_lite.training.loop import LoopState, StepRunner
from qlora_lite.training.loss import LossPath
from qlora_lite.training.task_causal_lm import CausalLMObjective

# The stated tolerance: over 6 optimizer steps, the lean bf16 loss stays within 0.5% of the upcast bf16 loss.
LEAN_TOLERANCE = 0.005


def _model(path: str, precision: str, dtype: str = "bf16"):
    base = load_base_model(path, quantization="nf4", compute_dtype=dtype)
    torch.manual_seed(3)
    return attach_lora(
        base, PeftSettings(r=8, dropout=0.0), gradient_checkpointing=False, precision=precision
    )


def _losses(model, examples, steps: int = 6) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    objective = CausalLMObjective(FastPaths(64, LossPath(chunked=True)))  # packed rows, chunked loss
    runner = StepRunner(
        model, optimizer, scheduler, examples, pad_token_id=0, device="cpu", objective=objective,
        autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    state = LoopState(micro_batch_size=2)
    model.train()
    return [runner.run(range(8), state) for _ in range(steps)]


def test_lean_bf16_keeps_frozen_parts_16bit_and_trains_like_the_upcast_path(tiny_model):
    rng = random.Random(0)
    upcast, lean = _model(tiny_model, "upcast"), _model(tiny_model, "lean")
    vocab = lean.config.vocab_size
    examples = []
    for n in [rng.randrange(8, 40) for _ in range(16)]:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        examples.append(Example(ids, [-100] * (n // 3) + ids[n // 3 :]))

    def dtypes(model):
        base = model.get_base_model()
        return (
            base.get_input_embeddings().weight.dtype,
            base.model.norm.weight.dtype,
            {p.dtype for n, p in model.named_parameters() if "lora_" in n},
        )

    assert dtypes(upcast) == (torch.float32, torch.float32, {torch.float32})
    assert dtypes(lean) == (torch.bfloat16, torch.bfloat16, {torch.float32})
    a, b = _losses(upcast, examples), _losses(lean, examples)
    assert a[-1] < a[0] * 0.95  # it trains at all
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(y - x) <= LEAN_TOLERANCE * x, f"step {step + 1}: lean {y:.4f} vs upcast {x:.4f}"


def test_lean_fp16_keeps_norms_and_the_residual_stream_fp32(tiny_model):
    model = _model(tiny_model, "lean", dtype="fp16")
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.float16
    assert base.model.norm.weight.dtype == torch.float32
    out = base.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32


def test_planner_models_both_precisions_and_says_which(tiny_model):
    common = dict(hardware="a100-80gb", max_seq_length=256, effective_batch_size=8, micro_batch_size=4)
    lean = plan(tiny_model, **common)
    upcast = plan(tiny_model, precision="upcast", **common)
    assert lean.precision == "lean" and upcast.precision == "upcast"
    assert lean.breakdown["other_params"] < upcast.breakdown["other_params"]
    assert lean.breakdown["activations"] < upcast.breakdown["activations"]
    assert "lean: embeddings, LM head, norms and the residual stream stay bf16" in lean.explain()
    assert "upcast (peft's default)" in upcast.explain()
    assert plan(tiny_model, hardware="t4", max_seq_length=256).reasons["precision"].startswith("lean: ")
    cpu = plan(tiny_model, hardware="cpu", max_seq_length=256)
    assert cpu.reasons["precision"] == "fp32 compute: every part is fp32 either way"
    assert lean.to_dict()["precision"] == "lean"
    classifier = plan(
        tiny_model, hardware="a100-80gb", task="classification", num_labels=3, max_seq_length=64
    )
    assert classifier.precision == "upcast"  # its trained head stays fp32
