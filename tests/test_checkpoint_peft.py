"""Every checkpoint holds an adapter that plain PEFT loads, so a user can pick an earlier step."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qlora_lite

ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(24)]


def test_an_intermediate_checkpoint_loads_with_plain_peft(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    qlora_lite.train(
        tiny_model, str(data), str(out), max_steps=4, save_every_steps=2, keep_checkpoints=3,
        effective_batch_size=4, micro_batch_size=2, lora_r=4, learning_rate=5e-3, progress=False,
    )  # fmt: skip
    folders = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [int(f.name.split("-")[1]) for f in folders] == [2, 4]
    step2 = folders[0]
    assert (step2 / "adapter_config.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, str(step2))
    exact = load_file(step2 / "adapter.safetensors")  # the full-name copy qlora_lite restores from
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == exact.keys()
    for name, tensor in exact.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    final = load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(exact[n], final[n.replace(".default", "")]) for n in exact), (
        "step 2 and the final adapter are the same: the test would not see a wrong checkpoint"
    )
