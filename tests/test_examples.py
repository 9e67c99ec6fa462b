"""Every shipped recipe in examples/ parses and plans through the real CLI, its Hub model on the stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_lite.cli.main import main
from qlora_lite.recipe import load_recipe

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
# SmolLM2-135M-Instruct's published config.json (the model the examples name), served by the Hub stand-in.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def test_there_are_examples_for_chat_instructions_and_classification():
    assert {p.name for p in EXAMPLES} >= {
        "chat_sft_hub.yaml",
        "instruction_pairs.yaml",
        "classification.yaml",
    }


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_each_example_parses_and_plans(recipe, hub_server, capsys):
    options = load_recipe(recipe)
    model = options["model"]
    hub_server.add_repo(model, {"config.json": json.dumps(SMOLLM2_CONFIG).encode()})
    assert main(["plan", "--config", str(recipe), "--gpu", "t4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True
    for knob in ("quantization", "max_seq_length", "lora_r", "micro_batch_size"):
        if knob in options:
            assert plan[knob] == options[knob], knob
    if "quantization" not in options:  # the HF name load_in_4bit: true must have reached the planner
        assert plan["quantization"] == "nf4"
