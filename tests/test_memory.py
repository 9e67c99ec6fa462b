"""The memory model: components add up, knobs move memory the right way, and it matches a real CPU step."""

from __future__ import annotations

import json

import pytest

from qlora_lite.errors import UserError
from qlora_lite.planner.memory import count_parameters, estimate_memory, model_shape

LLAMA2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)
LLAMA3_8B = {**LLAMA2_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256}


def test_breakdown_adds_up_to_peak():
    est = estimate_memory(LLAMA3_8B, micro_batch_size=2, seq_len=1024)
    assert est.peak_bytes == sum(est.breakdown.values())
    assert {"base_linear_weights", "quant_state", "other_params", "activations", "logits_loss"} <= set(
        est.breakdown
    )


def test_parameter_count_matches_llama2_7b():
    counts = count_parameters(LLAMA2_7B)
    assert counts["total"] == pytest.approx(6.74e9, rel=0.01)
    assert counts["linear"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_parameter_count_matches_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_checkpointing_lowers_activations():
    on = estimate_memory(LLAMA3_8B, seq_len=2048, gradient_checkpointing=True)
    off = estimate_memory(LLAMA3_8B, seq_len=2048, gradient_checkpointing=False)
    assert on.breakdown["activations"] < off.breakdown["activations"] / 5


def test_eager_costs_more_than_sdpa_at_long_sequences():
    kw = dict(seq_len=4096, gradient_checkpointing=False)
    eager = estimate_memory(LLAMA2_7B, attn_implementation="eager", **kw)
    sdpa = estimate_memory(LLAMA2_7B, attn_implementation="sdpa", **kw)
    assert eager.breakdown["activations"] > 1.5 * sdpa.breakdown["activations"]
    short_eager = estimate_memory(LLAMA2_7B, attn_implementation="eager", seq_len=64)
    short_sdpa = estimate_memory(LLAMA2_7B, attn_implementation="sdpa", seq_len=64)
    assert short_eager.peak_bytes < 1.05 * short_sdpa.peak_bytes


def test_double_quant_saves_about_0_373_bits_per_param():
    with_dq = estimate_memory(LLAMA2_7B, double_quant=True)
    without = estimate_memory(LLAMA2_7B, double_quant=False)
    linear = count_parameters(LLAMA2_7B)["linear"]
    saved_bits = (without.breakdown["quant_state"] - with_dq.breakdown["quant_state"]) * 8 / linear
    assert saved_bits == pytest.approx(0.373, abs=0.005)


def test_qlora_smaller_than_16bit_lora_for_7b():
    qlora = estimate_memory(LLAMA2_7B, quantization="nf4")
    lora16 = estimate_memory(LLAMA2_7B, quantization="none")
    assert qlora.peak_bytes < 0.6 * lora16.peak_bytes
    assert estimate_memory(LLAMA2_7B, quantization="int8").peak_bytes < lora16.peak_bytes


def test_8bit_optimizer_states_are_a_quarter():
    a = estimate_memory(LLAMA2_7B, optimizer="adamw_torch").breakdown["optimizer_states"]
    b = estimate_memory(LLAMA2_7B, optimizer="paged_adamw_8bit").breakdown["optimizer_states"]
    assert b * 4 == a


def test_fewer_lora_targets_fewer_lora_params():
    all_linear = estimate_memory(LLAMA2_7B).breakdown["lora_params"]
    qv = estimate_memory(LLAMA2_7B, lora_target_modules=["q_proj", "v_proj"]).breakdown["lora_params"]
    assert qv == 32 * 16 * 2 * (4096 + 4096) * 4
    assert qv < all_linear
    with pytest.raises(UserError, match="qkv"):
        estimate_memory(LLAMA2_7B, lora_target_modules=["qkv"])


def test_cpu_has_no_cuda_overhead_and_classification_has_no_logits():
    assert estimate_memory(LLAMA2_7B, device="cpu").breakdown["cuda_context"] == 0
    assert estimate_memory(LLAMA2_7B, device="cuda").breakdown["cuda_context"] > 0
    cls = estimate_memory(LLAMA2_7B, task="classification", num_labels=3)
    assert "logits_loss" not in cls.breakdown and cls.breakdown["head"] < 1e8


def test_large_vocab_logits_dominate_with_checkpointing():
    est = estimate_memory(LLAMA3_8B, seq_len=2048, micro_batch_size=2, gradient_checkpointing=True)
    assert est.breakdown["logits_loss"] > est.breakdown["activations"]


def test_missing_fields_name_them_and_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UserError) as info:
        estimate_memory(tmp_path)
    message = str(info.value)
    assert "intermediate_size" in message and "num_hidden_layers" in message and "config.json" in message
    with pytest.raises(UserError, match="no config.json"):
        model_shape(tmp_path / "nowhere")


def test_architectures_are_read():
    neox = model_shape({**LLAMA2_7B, "model_type": "gpt_neox"})
    assert [layer.name for layer in neox.layer_linears][0] == "query_key_value"
    phi3 = model_shape({**LLAMA2_7B, "model_type": "phi3"})
    assert phi3.layer_linears[0].name == "qkv_proj"
    bert = model_shape({"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536,
                        "num_hidden_layers": 6, "num_attention_heads": 12, "vocab_size": 30522})  # fmt: skip
    assert bert.family == "encoder"
    assert count_parameters(bert, task="classification", num_labels=2)["total"] == pytest.approx(
        22.7e6, rel=0.02
    )


def _tiny_llama(tmp_path):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_within_25_percent_of_a_real_4bit_cpu_step(tmp_path, checkpointing):
    import torch

    from qlora_lite.model.loading import LoraSettings, attach_lora, load_base_model
    from qlora_lite.planner.peak import track_peak

    path = _tiny_llama(tmp_path)
    model = load_base_model(str(path), quantization="nf4", compute_dtype="fp32", accelerator="cpu")
    model = attach_lora(model, LoraSettings(r=16), gradient_checkpointing=checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 4096, (2, 128))
    for _ in range(2):  # the second step has optimizer state, like every step after it
        with track_peak("cpu", [model, optimizer]) as peak:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    est = estimate_memory(path, compute_dtype="fp32", device="cpu", micro_batch_size=2, seq_len=128,
                          gradient_checkpointing=checkpointing)  # fmt: skip
    assert est.peak_bytes == pytest.approx(peak.peak_bytes, rel=0.25)


def _load_script(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def test_gpu_check_cases_predict_without_a_gpu(capsys, monkeypatch):
    import torch

    gpu_check = _load_script("gpu_check")
    for case in gpu_check.CASES:
        row = gpu_check.predict(case, "bf16")
        assert 1 * 1024**3 < row["predicted_bytes"] < 80 * 1024**3
    assert gpu_check.compare(110, 100) == {"error_pct": 10.0, "within_15pct": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_check.py"])
    assert gpu_check.main() == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
