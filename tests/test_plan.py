"""The planner: fixed knobs stay fixed, the effective batch is kept, and a non-fit says what would fit."""

from __future__ import annotations

import argparse
import json

import pytest

from qlora_lite.cli.plan import add_plan_parser, run_plan
from qlora_lite.errors import UserError
from qlora_lite.planner.planning import plan

LLAMA3_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
)  # fmt: skip
SMALL = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip


@pytest.mark.parametrize(
    "gpu,dtype", [("t4", "fp16"), ("v100", "fp16"), ("a100-80gb", "bf16"), ("l4", "bf16"), ("cpu", "fp32")]
)
def test_compute_dtype_follows_hardware(gpu, dtype):
    assert plan(SMALL, hardware=gpu).compute_dtype == dtype


def test_default_plan_fits_and_keeps_effective_batch():
    p = plan(LLAMA3_8B, hardware="t4")
    assert p.fits and p.quantization == "nf4"
    assert p.peak_memory_bytes <= p.usable_memory_bytes
    assert p.micro_batch_size * p.gradient_accumulation_steps == p.effective_batch_size == 16
    assert p.micro_batch_size & (p.micro_batch_size - 1) == 0
    assert 0 < p.checkpoint_every_seconds <= 600


def test_more_memory_gives_a_faster_plan():
    t4 = plan(LLAMA3_8B, hardware="t4")
    big = plan(LLAMA3_8B, hardware="a100-80gb")
    assert (big.micro_batch_size, not big.gradient_checkpointing) > (
        t4.micro_batch_size,
        not t4.gradient_checkpointing,
    )
    assert t4.gradient_checkpointing  # 8B on a T4 needs it


def test_fixed_knobs_stay_fixed():
    fixed = dict(micro_batch_size=2, gradient_checkpointing=True, optimizer="adamw_torch", max_seq_length=256,
                 lora_r=8, compute_dtype="fp32", double_quant=False)  # fmt: skip
    p = plan(SMALL, hardware="a100-80gb", **fixed)
    for key, value in fixed.items():
        assert getattr(p, key) == value
    assert p.gradient_accumulation_steps == 8
    assert set(fixed) <= set(p.fixed)
    assert "fixed by you" in p.explain()


def test_effective_batch_not_divisible_is_reported():
    p = plan(SMALL, hardware="a100-80gb", effective_batch_size=12, micro_batch_size=8)
    assert p.gradient_accumulation_steps == 2
    assert "not a multiple" in p.reasons["gradient_accumulation_steps"]
    with pytest.raises(UserError, match="effective batch"):
        plan(SMALL, hardware="t4", effective_batch_size=12, micro_batch_size=8, gradient_accumulation_steps=2)


def test_all_fixed_and_too_big_returns_estimate_with_nearest_fit():
    p = plan(LLAMA3_8B, hardware="t4", micro_batch_size=8, gradient_accumulation_steps=2, max_seq_length=2048,
             gradient_checkpointing=False, optimizer="adamw_torch")  # fmt: skip
    assert not p.fits
    assert p.peak_memory_bytes > p.usable_memory_bytes
    assert p.micro_batch_size == 8 and not p.gradient_checkpointing
    assert p.nearest_fit and p.nearest_fit["peak_memory_bytes"] <= p.usable_memory_bytes
    assert p.nearest_fit["micro_batch_size"] * p.nearest_fit["gradient_accumulation_steps"] == 16
    assert "nearest plan that fits" in p.explain()


def test_nothing_fits_says_the_smallest_memory():
    p = plan(LLAMA3_8B, hardware="t4", max_memory="3GiB", max_seq_length=4096)
    assert not p.fits
    assert "needs" in p.message and "GiB of usable memory" in p.message


def test_seq_len_from_data_lengths():
    lengths = [100] * 95 + [300] * 4 + [5000]
    p = plan(SMALL, data=lengths, hardware="a100-80gb")
    assert p.max_seq_length == 384 and p.truncated_examples == 1 and p.num_examples == 100
    limited = plan({**SMALL, "max_position_embeddings": 256}, data=lengths, hardware="a100-80gb")
    assert limited.max_seq_length == 256


def test_budget_is_respected_and_used():
    budget = 2 * 1024**3
    p = plan(SMALL, hardware="cpu", max_memory=budget, max_seq_length=512)
    assert p.fits and p.usable_memory_bytes == budget
    assert 0.45 * budget < p.peak_memory_bytes <= budget


def test_with_micro_batch_keeps_effective_batch():
    p = plan(SMALL, hardware="a100-80gb", effective_batch_size=16)
    for n in (8, 4, 3, 1):
        q = p.with_micro_batch(n)
        assert q.micro_batch_size == n
        assert q.gradient_accumulation_steps == -(-16 // n)
        assert q.effective_batch_size == 16
    assert p.with_micro_batch(1).peak_memory_bytes <= p.peak_memory_bytes


def test_unknown_knob_and_bad_values_are_user_errors():
    with pytest.raises(UserError, match="unknown planning knob"):
        plan(SMALL, hardware="t4", batch=3)
    with pytest.raises(UserError, match="quantization"):
        plan(SMALL, hardware="t4", quantization="fp4")
    with pytest.raises(UserError, match="positive integer"):
        plan(SMALL, hardware="t4", micro_batch_size=0)
    with pytest.raises(UserError, match="known profiles"):
        plan(SMALL, hardware="tpu")


def test_plan_from_a_folder_with_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    assert plan(tmp_path, hardware="t4").fits


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_cli_json_prints_one_object(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    args = _parse(["--model", str(tmp_path), "--gpu", "t4", "--json", "--gradient-checkpointing", "on",
                   "--lora-target-modules", "q_proj,v_proj"])  # fmt: skip
    assert run_plan(args) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("peak_memory_bytes", "usable_memory_bytes", "breakdown", "quantization", "compute_dtype",
                "micro_batch_size", "gradient_accumulation_steps", "effective_batch_size", "max_seq_length",
                "gradient_checkpointing", "optimizer", "checkpoint_every_seconds", "fits", "hardware"):  # fmt: skip
        assert key in data
    assert data["gradient_checkpointing"] is True and data["lora_target_modules"] == ["q_proj", "v_proj"]


def test_cli_not_fitting_exits_0_with_nearest_fit(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    args = _parse(["--model", str(tmp_path), "--gpu", "t4", "--json", "--micro-batch-size", "16",
                   "--gradient-accumulation-steps", "1", "--gradient-checkpointing", "off", "--optimizer",
                   "adamw_torch", "--max-seq-length", "1024"])  # fmt: skip
    assert run_plan(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["nearest_fit"]


def test_cli_table_and_data_lengths(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    args = _parse(["--model", str(tmp_path), "--gpu", "cpu", "--data", "train.jsonl", "--max-memory", "3GiB"])
    assert run_plan(args, lengths_from_data=lambda source, model_path: [50, 60, 700]) == 0
    out = capsys.readouterr().out
    assert "gradient_checkpointing" in out and "768" in out
