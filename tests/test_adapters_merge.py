"""Merging (16-bit and QLoRA, checked against references) and combining adapters, with PEFT's missing guards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapters_util import make_adapter

from qlora_lite.cli.main import main as cli_main
from qlora_lite.errors import UserError
from qlora_lite.inference.adapters import AdapterSet
from qlora_lite.inference.combine import combine_problems
from qlora_lite.inference.merge import MERGE_REPORT, merge_adapter

IDS = torch.tensor([[5, 17, 42, 9, 88, 3], [7, 7, 120, 64, 2, 11]])


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("merge-adapters")
    return {
        "r4": make_adapter(tiny_model, root / "r4", seed=1),
        "r8": make_adapter(tiny_model, root / "r8", seed=2, r=8, targets=("q_proj", "v_proj", "up_proj")),
        "r4b": make_adapter(tiny_model, root / "r4b", seed=5),
        "dora": make_adapter(tiny_model, root / "dora", seed=3, use_dora=True),
        "rslora": make_adapter(tiny_model, root / "rslora", seed=4, use_rslora=True),
        "pattern": make_adapter(tiny_model, root / "pattern", seed=6, rank_pattern={"v_proj": 2}),
    }


def _qlora_run(adapter: str, base: str, folder) -> str:
    """The adapter as a run folder whose record says it was trained on an NF4 base."""
    shutil.copytree(adapter, folder)
    plan = {"quantization": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    (folder / "run_record.json").write_text(
        json.dumps({"task": "causal_lm", "base_model": {"path": base}, "plan": plan})
    )
    return str(folder)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_16bit_merge_equals_base_plus_adapter_and_loads_with_plain_transformers(tiny_model, made, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = merge_adapter(made["r8"], tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    reference = _logits(PeftModel.from_pretrained(base, made["r8"]).eval())
    torch.testing.assert_close(_logits(merged), reference, rtol=0, atol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    report = json.loads((tmp_path / "merged" / MERGE_REPORT).read_text())
    assert report["max_abs_logit_diff"] < 1e-4 and report["trained_quantization"] == "none"
    assert result.max_abs_diff == report["max_abs_logit_diff"]
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_qlora_merge_equals_the_dequantized_base_plus_adapter(tiny_model, made, tmp_path):
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = _qlora_run(made["r4"], tiny_model, tmp_path / "run")
    merge_adapter(run, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    # The reference, built by hand: every 4-bit weight dequantized with bitsandbytes, put into a 32-bit copy.
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=bnb, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    changed = 0
    for name, module in quantized.named_modules():
        if type(module).__name__ == "Linear4bit":
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            reference.get_submodule(name).weight.data.copy_(weight)
            changed += 1
    assert changed == 14
    expected = _logits(PeftModel.from_pretrained(reference, made["r4"]).eval())
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-4)
    original = _logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), made["r4"])
    )
    assert (original - expected).abs().max() > 1e-3, "merging into the original 16-bit weights would differ"
    report = json.loads((tmp_path / "merged" / MERGE_REPORT).read_text())
    assert (
        report["trained_quantization"] == "nf4" and report["max_abs_logit_diff_unmerged_same_weights"] < 1e-4
    )
    # Against the 4-bit model itself the CPU 4-bit kernel's own rounding shows (recorded, not hidden).
    assert report["max_abs_logit_diff"] < 0.05


def test_requantizing_is_refused_unless_asked_and_says_what_it_costs(made, tmp_path, capsys):
    with pytest.raises(UserError, match="re-quantiz.*--allow-requantize"):
        merge_adapter(made["r4"], tmp_path / "m", quantize="nf4")
    code = cli_main(["merge", made["r4"], "--output", str(tmp_path / "m"), "--quantize", "nf4"])
    assert code == 2 and "peft #1043" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    asked = merge_adapter(made["r4"], tmp_path / "q", dtype="fp32", quantize="nf4", allow_requantize=True)
    report = asked.report
    assert (
        report["quantized_to"] == "nf4"
        and report["requantized_max_abs_logit_diff"] > report["max_abs_logit_diff"]
    )
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert not (tmp_path / "q" / ".merged-16bit").exists()


def test_combine_guards_refuse_what_peft_gets_wrong(tiny_model, made):
    aset = AdapterSet(tiny_model, {k: made[k] for k in made}, quantization="none")
    cases = {
        ("r4", "r8", "linear"): "needs one rank",
        ("r4", "dora", "cat"): "DoRA",
        ("r4", "rslora", "cat"): "rsLoRA",
        ("r4", "pattern", "cat"): "rank_pattern",
    }
    for (a, b, method), reason in cases.items():
        with pytest.raises(UserError, match=reason):
            aset.combine("mix", [a, b], method=method)
        assert "mix" not in aset.names
    aset.combine("mix", ["r4", "r8"], method="cat", weights=[1.0, 0.5])
    with pytest.raises(UserError, match="already exists|already loaded"):
        aset.combine("mix", ["r4", "r4b"], method="linear")  # PEFT would keep the old one without a word
    aset.combine("lin", ["r4", "r4b"], method="linear")
    ids = IDS
    base, mixed, lin = aset.logits(ids, None), aset.logits(ids, "mix"), aset.logits(ids, "lin")
    assert not torch.allclose(mixed, base, atol=1e-3) and not torch.allclose(lin, mixed, atol=1e-3)
    assert aset.info("mix")["rank"] == 12
    assert combine_problems({"x": {"r": 4}}, "cat", "y", []) == ["give at least two adapters to combine"]
    assert "not one of" in combine_problems({"x": {"r": 4}, "y": {"r": 4}}, "sum", "z", [])[0]


def test_combine_cli_writes_an_adapter_that_loads_back(tiny_model, made, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "combined"
    assert cli_main(["combine", made["r4"], made["r4b"], "--method", "cat", "--output", str(out)]) == 0
    record = json.loads((out / "run_record.json").read_text())
    assert record["combined"]["method"] == "cat" and len(record["combined"]["inputs"]) == 2
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    assert plain.peft_config["default"].r == 8
    aset = AdapterSet(tiny_model, {"both": str(out)}, quantization="none")
    assert not torch.allclose(aset.logits(IDS, "both"), aset.logits(IDS, None), atol=1e-3)
    assert (
        cli_main(["combine", made["r4"], made["r8"], "--method", "linear", "--output", str(tmp_path / "x")])
        == 2
    )


def test_a_dora_adapter_loaded_after_generations_reads_unpacked_4bit_weights(made, tiny_model, tmp_path):
    """bitsandbytes repacks 4-bit weights at the first eval-mode forward on AVX512-BF16 CPUs, and DoRA's norms
    then read the repacked bytes: an AdapterSet that already answered with a LoRA adapter must give a DoRA
    adapter loaded later the logits of a set that only ever held it (elsewhere nothing is repacked)."""
    lora_run = _qlora_run(made["r4"], tiny_model, tmp_path / "r4")
    dora_run = _qlora_run(made["dora"], tiny_model, tmp_path / "dora")
    used = AdapterSet(tiny_model, {"r4": lora_run})
    used.logits(IDS, "r4")  # an eval-mode forward: the repacking happens here where the CPU has the kernel
    used.load("dora", dora_run)
    fresh = AdapterSet(tiny_model, {"dora": dora_run})
    torch.testing.assert_close(used.logits(IDS, "dora"), fresh.logits(IDS, "dora"), rtol=0, atol=1e-6)
