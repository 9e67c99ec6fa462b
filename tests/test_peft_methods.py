"""Every PEFT method of the registry on a tiny 4-bit model: it trains (trainable weights move, the frozen base
stays bit-identical), saves, loads with plain PEFT to the same logits, and resumes exactly after a kill.
Plus LoRA+'s two learning rates read back from the optimizer, and what PiSSA/LoftQ do to the base."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_lite
from qlora_lite.checkpoint.store import CheckpointStore
from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.planner.planning import plan

WORKER = str(Path(__file__).with_name("train_worker.py"))
ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(24)]
# packing off: the kill point below counts one padded micro-batch of 2 examples per forward call
BASE = dict(
    max_steps=6, effective_batch_size=4, micro_batch_size=2, lora_r=4, seed=5, progress=False, packing=False
)
METHODS = {
    "dora": dict(lora_method="dora"),
    "rslora+loraplus": dict(rslora=True, lora_plus_ratio=16.0),
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "loftq": dict(init_lora_weights="loftq"),
    "loftq3": dict(init_lora_weights="loftq", loftq_iter=3),  # rewrites the base: trains on loftq_base/
    "ia3": dict(peft_method="ia3", learning_rate=1e-2),
    "prompt_tuning": dict(peft_method="prompt_tuning", num_virtual_tokens=4, learning_rate=1e-2),
    "prefix_tuning": dict(peft_method="prefix_tuning", num_virtual_tokens=4, learning_rate=1e-2),
}
# PiSSA/OLoRA leave W - s*B0@A0 in the 4-bit base; the saved adapter is converted to the original base,
# so plain PEFT on the original 4-bit base differs by the two quantization errors (exact in fp32: below).
CONVERTED = ("pissa", "olora")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


class Snapshot:
    """Remembers the model when it is ready: its trainable and its frozen tensors."""

    def on_model_ready(self, model) -> None:
        self.model = model
        self.trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen = {n: t.detach().clone() for n, t in _frozen(model).items()}


def _frozen(model) -> dict[str, torch.Tensor]:
    """Every frozen tensor (4-bit weights as their packed bytes, norms, embeddings) and buffer."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {n: p for n, p in model.named_parameters() if n not in trainable}
    out.update(dict(model.named_buffers()))
    return out


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 29, 41, 53, 65, 77, 89], [6, 18, 30, 42, 54, 66, 78, 90]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _plain_peft_logits(
    model_path: str, adapter: Path, quantized: bool = True, dora: bool = False
) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **kwargs)
    # On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first eval forward for a bf16 kernel
    # (logits ~1e-3 away from the training kernel's), and DoRA then takes the norms of the repacked bytes
    # (~0.1 away: qlora_lite's loader guards DoRA adapters). The guard keeps the kernel training used.
    from qlora_lite.compat import keep_4bit_weights_differentiable

    keep_4bit_weights_differentiable(base)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(**_inputs()).logits


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_inputs()).logits


def _losses(path: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _worker(model: str, data: str, out: Path, settings: dict, **kill) -> subprocess.CompletedProcess:
    job = {"model": model, "data": data, "out": str(out), "settings": settings, **kill}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, WORKER, json.dumps(job)], capture_output=True, text=True, env=env, timeout=600
    )


def _train_reference(tiny_model: str, data_file: str, out: Path, settings: dict) -> Snapshot:
    snap = Snapshot()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the single-threaded workers: bit-comparable runs
    try:
        qlora_lite.train(tiny_model, data_file, out, callbacks=[snap], **settings)
    finally:
        torch.set_num_threads(threads)
    return snap


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_and_loads_with_plain_peft(name, tiny_model, data_file, tmp_path):
    settings = {**BASE, **METHODS[name], "max_steps": 4}
    snap = _train_reference(tiny_model, data_file, tmp_path, settings)
    model = snap.model
    # trains: every trainable tensor moved; the frozen base (after the init) is bit-identical
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, snap.trainable[n])
    ]
    assert moved and len(moved) == len(snap.trainable), sorted(set(snap.trainable) - set(moved))[:5]
    for key, tensor in _frozen(model).items():
        assert torch.equal(tensor, snap.frozen[key]), f"frozen {key} changed"
    # the run record and the plan name the method; adapter_config.json shows it to `adapters inspect`
    record = json.loads((tmp_path / "run_record.json").read_text())
    assert record["peft"]["description"] == PeftSettings.from_record(record["peft"]).describe()
    assert record["plan"]["peft"]["method"] == settings.get("peft_method", "lora")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == record["peft"]["peft_type"]
    assert config.get("use_dora", False) is (name == "dora")
    # the compatibility report ([11]) sees the method: vLLM serves plain LoRA only (no DoRA, IA3, prompts)
    from qlora_lite.inference.portability import adapter_report

    report = adapter_report(tmp_path)
    plain_lora = name not in ("dora", "ia3", "prompt_tuning", "prefix_tuning")
    assert report["vllm"]["ok"] is plain_lora, report["vllm"]
    own_base = name == "loftq3"  # llama.cpp cannot convert a bitsandbytes base: merge first
    assert report["llama_cpp"]["ok"] is (plain_lora and name != "rslora+loraplus" and not own_base)
    from qlora_lite.hub.card import render_model_card

    card = render_model_card(tmp_path, "someone/adapter")
    assert record["peft"]["description"] in card
    assert ("- dora" in card) is (name == "dora") and ("- ia3" in card) is (name == "ia3")
    # saves and loads with plain PEFT to the same logits
    plain = _plain_peft_logits(str(tmp_path / "loftq_base") if own_base else tiny_model, tmp_path)
    if name in CONVERTED:
        assert config["r"] == 2 * BASE["lora_r"]  # [A; A0], [B, -B0] on the original base
    else:
        torch.testing.assert_close(plain, _logits(model), rtol=1e-4, atol=1e-4)


# By default DoRA and LoftQ-3 resume after a kill; the other base-changing inits and prompt methods: slow tier.
RESUME_FAST = ("dora", "loftq3")  # loftq3: the resume puts the saved base back (model/loftq_base.py)


@pytest.mark.parametrize(
    "name", [n if n in RESUME_FAST else pytest.param(n, marks=pytest.mark.slow) for n in METHODS]
)
def test_method_resumes_exactly_after_a_kill(name, tiny_model, data_file, tmp_path):
    settings = {**BASE, **METHODS[name], "save_every_steps": 2}
    ref = tmp_path / "ref"
    _train_reference(tiny_model, data_file, ref, settings)
    # forward 8 = step 4's first micro-batch (forward 1 is the probe): the checkpoint of step 2 resumes
    out = tmp_path / "killed"
    killed = _worker(tiny_model, data_file, out, settings, kill_at_forward=8)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert CheckpointStore(out / "checkpoints").latest().step == 2
    resumed = _worker(tiny_model, data_file, out, settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] == 2
    got, want = _losses(out / "steps.jsonl"), _losses(ref / "steps.jsonl")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-5)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_lora_plus_puts_the_b_matrices_in_their_own_group_at_ratio_times_the_rate(
    tiny_model, data_file, tmp_path
):
    settings = {**BASE, "max_steps": 2, "save_every_steps": 1, "lr_scheduler": "constant"}
    result = qlora_lite.train(tiny_model, data_file, tmp_path, lora_plus_ratio=8.0, **settings)
    store = CheckpointStore(tmp_path / "checkpoints")
    info = store.latest()
    state = torch.load(io.BytesIO(store.read(info, "optimizer.pt")), weights_only=True)
    groups = state["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 8 * 2e-4])
    names = info.metadata["trainable_parameters"]
    n_b = sum("lora_B" in n for n in names)
    assert len(groups[1]["params"]) == n_b and len(groups[0]["params"]) == len(names) - n_b
    assert result.metrics["steps"] == 2


def _target_weight(model, name: str):
    module = dict(model.named_modules())[name]
    return module, module.get_base_layer()


def _original(model_path: str, key: str) -> torch.Tensor:
    return load_file(Path(model_path) / "model.safetensors")[key].float()


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_pissa_and_loftq_change_the_residual_as_documented(init, tiny_model):
    import bitsandbytes.functional as bnbf

    from qlora_lite.model.loading import attach_lora, load_base_model

    settings = PeftSettings(r=4, init=init, target_modules=("q_proj",))
    model = attach_lora(
        load_base_model(tiny_model), settings, gradient_checkpointing=False, model_path=tiny_model
    )
    plain = load_base_model(tiny_model)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    module, base = _target_weight(model, name)
    w = _original(tiny_model, "model.layers.0.self_attn.q_proj.weight")
    a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
    deq = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    plain_weight = plain.model.layers[0].self_attn.q_proj.weight
    plain_deq = bnbf.dequantize_4bit(plain_weight.data, plain_weight.quant_state).float()
    u, sv, vh = torch.linalg.svd(w if init == "pissa" else w - plain_deq, full_matrices=False)
    best = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
    # s * B @ A is the best rank-r approximation: of W (PiSSA) or of the 4-bit error W - Q(W) (LoftQ)
    torch.testing.assert_close(s * b @ a, best, rtol=1e-3, atol=1e-4)
    if init == "pissa":
        # the 4-bit base now holds Q(W - s*B@A), quantized with the layer's own settings
        assert not torch.equal(base.weight.data, plain_weight.data)
        residual = (w - s * b @ a).to(base.weight.quant_state.dtype)
        q, state = bnbf.quantize_4bit(residual, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(deq, bnbf.dequantize_4bit(q, state).float())
    else:
        # LoftQ (1 iteration) keeps the base as loaded and cancels the quantization error's top-r part
        assert torch.equal(base.weight.data, plain_weight.data)
        assert torch.linalg.norm(w - deq - s * b @ a) < 0.99 * torch.linalg.norm(w - deq)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_converted_adapter_on_an_unquantized_base_gives_the_trained_logits(
    init, tiny_model, data_file, tmp_path
):
    snap = Snapshot()
    settings = {**BASE, "max_steps": 2, "quantization": "none", "init_lora_weights": init}
    qlora_lite.train(tiny_model, data_file, tmp_path, callbacks=[snap], **settings)
    plain = _plain_peft_logits(tiny_model, tmp_path, quantized=False)
    torch.testing.assert_close(plain, _logits(snap.model), rtol=1e-4, atol=1e-4)


SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192}  # fmt: skip


def test_the_memory_model_charges_each_method_its_own_terms(tiny_model):
    knobs = dict(hardware="t4", micro_batch_size=4, gradient_checkpointing=False, max_seq_length=128)

    def planned(**peft):
        return plan(SMOLLM2, peft=PeftSettings(**peft), **knobs)

    lora, dora = planned(), planned(lora_method="dora")
    assert dora.breakdown["activations"] > lora.breakdown["activations"]
    assert dora.breakdown["peft_transient"] > 0 and lora.breakdown["peft_transient"] == 0
    assert dora.estimated_step_seconds > lora.estimated_step_seconds
    assert planned(init="pissa").estimated_init_seconds > 0 == lora.estimated_init_seconds
    assert planned(method="ia3").breakdown["lora_params"] < lora.breakdown["lora_params"] / 10
    prompt = planned(method="prompt_tuning", num_virtual_tokens=64)
    # 64 more positions per sequence at the loss: with the model's own loss, micro-batch 4 x 64 x vocab x
    # 12.1 B (fp16 on a T4); with the chunked loss one chunk of logits either way, so only the gathered hidden
    # states (4 x 64 x hidden x 8 B) grow.
    extra = prompt.breakdown["logits_loss"] - lora.breakdown["logits_loss"]
    assert extra == pytest.approx(4 * 64 * SMOLLM2["hidden_size"] * 8, rel=1e-3)
    whole = {
        name: plan(SMOLLM2, peft=PeftSettings(**peft), chunked_loss=False, **knobs).breakdown["logits_loss"]
        for name, peft in (("lora", {}), ("prompt", {"method": "prompt_tuning", "num_virtual_tokens": 64}))
    }
    assert whole["prompt"] - whole["lora"] == pytest.approx(4 * 64 * SMOLLM2["vocab_size"] * 12.1, rel=1e-3)
    fewer = planned(rank_pattern={"down_proj": 1})
    assert fewer.breakdown["lora_params"] < lora.breakdown["lora_params"]
    attention, mlp = (plan(SMOLLM2, lora_target_modules=p, **knobs) for p in ("attention", "mlp"))
    assert attention.breakdown["lora_params"] + mlp.breakdown["lora_params"] == lora.breakdown["lora_params"]
    # prefix tuning cannot run under checkpointing: the planner never picks it, and refuses it when fixed
    assert (
        plan(tiny_model, hardware="t4", peft=PeftSettings(method="prefix_tuning")).gradient_checkpointing
        is False
    )
    with pytest.raises(UserError, match="gradient checkpointing"):
        plan(
            tiny_model, hardware="t4", gradient_checkpointing=True, peft=PeftSettings(method="prefix_tuning")
        )
    assert "DoRA" in dora.explain() and "weight norms" in dora.explain()
    assert dora.to_dict()["peft"]["lora_method"] == "dora"


def test_bad_method_options_are_one_clear_error(tiny_model, data_file, tmp_path):
    with pytest.raises(UserError) as err:
        qlora_lite.train(
            tiny_model, data_file, tmp_path, peft_method="lokr", lora_plus_ratio=-1.0, init_lora_weights="x"
        )
    assert all(word in str(err.value) for word in ("'lokr'", "lora_plus_ratio", "init_lora_weights"))
    with pytest.raises(UserError, match=r"loftq_iter must be >= 1 \(got 0\)"):
        qlora_lite.train(tiny_model, data_file, tmp_path, init_lora_weights="loftq", loftq_iter=0)
    with pytest.raises(UserError, match="init_lora_weights='loftq' needs a 4-bit NF4 base"):
        qlora_lite.train(
            tiny_model, data_file, tmp_path, init_lora_weights="loftq", quantization="none", **BASE
        )


def test_cli_flags_reach_the_plan(tiny_model, capsys):
    from qlora_lite.cli.main import main

    args = ["plan", "--model", tiny_model, "--gpu", "t4", "--json", "--lora-method", "dora", "--rslora",
            "--lora-plus-ratio", "16", "--init-lora-weights", "gaussian", "--target-modules", "mlp",
            "--rank-pattern", "down_proj=2"]  # fmt: skip
    assert main(args) == 0
    peft = json.loads(capsys.readouterr().out)["peft"]
    got = (peft["lora_method"], peft["rslora"], peft["lora_plus_ratio"], peft["init"])
    assert got == ("dora", True, 16.0, "gaussian")
    assert peft["target_modules"] == "mlp" and peft["rank_pattern"] == {"down_proj": 2}
    assert (
        main(
            [
                "plan",
                "--model",
                tiny_model,
                "--peft-method",
                "prefix_tuning",
                "--gradient-checkpointing",
                "on",
            ]
        )
        == 2
    )


def test_recipes_take_the_peft_and_axolotl_names(tmp_path):
    from qlora_lite.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(
        "use_dora: true\nuse_rslora: true\nloraplus_lr_ratio: 16\ninit_lora_weights: pissa\n"
        "peft_method: lora\nrank_pattern: {down_proj: 4}\ntarget_modules: attention\n"
    )
    known = ("lora_method", "rslora", "lora_plus_ratio", "init_lora_weights", "peft_method", "rank_pattern",
             "lora_target_modules")  # fmt: skip
    assert load_recipe(path, known) == {
        "lora_method": "dora", "rslora": True, "lora_plus_ratio": 16, "init_lora_weights": "pissa",
        "peft_method": "lora", "rank_pattern": {"down_proj": 4}, "lora_target_modules": "attention",
    }  # fmt: skip
