"""The whole train path on tiny in-process models, in 4-bit NF4 on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qlora_lite
from qlora_lite.errors import UserError
from qlora_lite.model.loading import load_for_inference

INSTRUCTION_ROWS = [
    {"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(24)
]
FAST = dict(max_steps=3, effective_batch_size=4, micro_batch_size=2, progress=False, lora_r=4, seed=7)


class Snapshot:
    """Keeps the model train() builds, and copies of its parameters at the start."""

    def on_model_ready(self, model) -> None:
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        # 4-bit weights are uint8 Params4bit; include buffers-like quantized storage through state_dict.
        self.state_before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_train_changes_only_lora_and_saves_a_peft_adapter(tiny_models, tmp_path, arch):
    snap = Snapshot()
    result = qlora_lite.train(tiny_models[arch], INSTRUCTION_ROWS, tmp_path / "run", callbacks=[snap], **FAST)

    assert getattr(snap.model, "is_loaded_in_4bit", False) or snap.model.base_model.model.is_loaded_in_4bit
    changed = [
        n for n, p in snap.model.named_parameters() if p.requires_grad and not torch.equal(p, snap.before[n])
    ]
    trainable = [n for n, p in snap.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # Every LoRA B matrix starts at zero and must have moved; A matrices move once B is non-zero.
    assert all(n in changed for n in trainable if "lora_B" in n)
    for key, value in snap.model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, snap.state_before[key]), f"frozen {key} changed"

    out = result.output_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "run_record.json",
        "loss.png",
        "steps.jsonl",
    ):
        assert (out / name).is_file(), name
    assert (out / "tokenizer_config.json").is_file()
    record = json.loads((out / "run_record.json").read_text())
    assert record["base_model"]["path"] == tiny_models[arch]
    assert record["quantization"]["method"] == "nf4"
    assert record["data"]["format"] == "instruction" and len(record["data"]["fingerprint"]) == 64
    assert record["metrics"]["steps"] == 3 and record["plan"]["effective_batch_size"] == 4
    assert record["versions"]["torch"] == torch.__version__
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
    # Only the adapter is saved: no base weights in the run folder.
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_saved_adapter_loads_with_plain_peft_and_matches_qlora_lite_inference(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    result = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "run", **FAST)
    ours, tokenizer = load_for_inference(result.adapter_dir)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=bnb, device_map="cpu", dtype=torch.float32
    )
    from qlora_lite.compat import keep_4bit_weights_differentiable

    keep_4bit_weights_differentiable(base)  # the kernel qlora_lite runs on every CPU (qlora_lite.compat)
    plain = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    ids = torch.tensor([tokenizer("What is the capital of France?")["input_ids"]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), plain.disable_adapter():
        base_logits = plain(input_ids=ids).logits
    assert not torch.allclose(base_logits, expected, atol=1e-4), "the adapter must change the output"


def test_same_seed_same_adapter_and_different_seed_differs(tiny_model, tmp_path):
    first = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "a", **FAST)
    second = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "b", **FAST)
    other = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "c", **{**FAST, "seed": 8})
    a, b, c = (load_file(r.output_dir / "adapter_model.safetensors") for r in (first, second, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class OomAt:
    """Raises a real torch.OutOfMemoryError from a forward hook on the given forward calls."""

    def __init__(self, calls: set[int]) -> None:
        self.calls, self.count = calls, 0

    def on_model_ready(self, model) -> None:
        def hook(module, args):
            if not module.training:  # count training forwards only (not the periodic eval)
                return
            self.count += 1
            if self.count in self.calls:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        model.get_base_model().model.layers[0].register_forward_pre_hook(hook)


def test_out_of_memory_halves_micro_batch_and_keeps_the_effective_batch(tiny_model, tmp_path):
    # Padded micro-batches: the call arithmetic below counts one forward per 4 examples.
    settings = {**FAST, "max_steps": 4, "effective_batch_size": 8, "micro_batch_size": 4, "lora_dropout": 0.0}
    settings["packing"] = False
    clean = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "clean", **settings)
    # Call 1 is the probe; call 4 falls inside optimizer step 2 (probe=1 call, step 1 = 2 calls at micro 4).
    injected = OomAt({4})
    backed_off = qlora_lite.train(
        tiny_model, INSTRUCTION_ROWS, tmp_path / "oom", callbacks=[injected], **settings
    )

    assert backed_off.metrics["oom_backoffs"] == 1
    assert backed_off.metrics["final_micro_batch_size"] == 2
    for key in ("steps", "examples_seen", "tokens_seen"):
        assert backed_off.metrics[key] == clean.metrics[key], key
    rows = [
        json.loads(x)
        for x in (backed_off.output_dir / "steps.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert [r["micro_batch_size"] for r in rows] == [4, 2, 2, 2]
    # Same examples per step and a loss normalised over the whole step: the same training, up to rounding.
    a = load_file(clean.output_dir / "adapter_model.safetensors")
    b = load_file(backed_off.output_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_out_of_memory_with_packed_rows_halves_the_rows_and_trains_the_same(tiny_model, tmp_path):
    """Packed rows of 32 tokens, 2 rows per micro-batch; an OOM in step 2 halves it to 1 row: same update."""
    settings = {**FAST, "max_steps": 3, "effective_batch_size": 8, "micro_batch_size": 2, "lora_dropout": 0.0}
    settings["max_seq_length"] = 32
    clean = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "clean", **settings)
    assert clean.plan.packing
    backed_off = qlora_lite.train(
        tiny_model, INSTRUCTION_ROWS, tmp_path / "oom", callbacks=[OomAt({4})], **settings
    )
    assert backed_off.metrics["oom_backoffs"] == 1 and backed_off.metrics["final_micro_batch_size"] == 1
    for key in ("steps", "examples_seen", "tokens_seen"):
        assert backed_off.metrics[key] == clean.metrics[key], key
    a = load_file(clean.output_dir / "adapter_model.safetensors")
    b = load_file(backed_off.output_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_out_of_memory_in_the_probe_backs_off_before_the_first_step(tiny_model, tmp_path):
    result = qlora_lite.train(
        tiny_model,
        INSTRUCTION_ROWS,
        tmp_path / "run",
        callbacks=[OomAt({1})],
        **{**FAST, "micro_batch_size": 4},
    )
    assert result.metrics["oom_backoffs"] == 1 and result.metrics["final_micro_batch_size"] == 2
    assert result.metrics["steps"] == 3


def test_out_of_memory_at_micro_batch_one_is_a_user_error(tiny_model, tmp_path):
    with pytest.raises(UserError, match="micro-batch 1"):
        qlora_lite.train(
            tiny_model, INSTRUCTION_ROWS, tmp_path / "run", callbacks=[OomAt(set(range(1, 50)))], **FAST
        )


@pytest.mark.parametrize(
    "rows",
    [
        [
            {
                "messages": [
                    {"role": "user", "content": f"hi {i}"},
                    {"role": "assistant", "content": f"hello {i}"},
                ]
            }
            for i in range(12)
        ],
        [
            {"conversations": [{"from": "human", "value": f"q {i}"}, {"from": "gpt", "value": f"a {i}"}]}
            for i in range(12)
        ],
        [{"prompt": f"2 + {i} =", "completion": f" {2 + i}"} for i in range(12)],
        [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(12)],
        [{"text": f"The quick brown fox number {i} jumps."} for i in range(12)],
    ],
    ids=["chat", "sharegpt", "prompt_completion", "question_answer", "text"],
)
def test_each_data_format_trains(tiny_model, tmp_path, rows):
    result = qlora_lite.train(tiny_model, rows, tmp_path / "run", **{**FAST, "max_steps": 1})
    assert result.metrics["steps"] == 1 and result.metrics["tokens_seen"] > 0


def test_a_finished_run_is_returned_a_different_one_refused_unless_overwrite(tiny_model, tmp_path):
    first = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "run", **{**FAST, "max_steps": 1})
    adapter_bytes = (first.output_dir / "adapter_model.safetensors").read_bytes()
    # Re-running the same cell after it finished: nothing to do, the same result.
    again = qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "run", **{**FAST, "max_steps": 1})
    assert again.metrics == first.metrics
    with pytest.raises(UserError, match="already holds a different finished run"):
        qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "run", **{**FAST, "max_steps": 2})
    assert (first.output_dir / "adapter_model.safetensors").read_bytes() == adapter_bytes
    replaced = qlora_lite.train(
        tiny_model, INSTRUCTION_ROWS, tmp_path / "run", overwrite=True, **{**FAST, "max_steps": 2}
    )
    assert replaced.metrics["steps"] == 2 and replaced.resumed_from_step is None


def test_unknown_setting_and_bad_values_are_user_errors(tiny_model, tmp_path):
    with pytest.raises(UserError, match="unknown training setting.*learning_rat"):
        qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "run", learning_rat=1e-4)
    with pytest.raises(UserError, match="max_steps must be >= 1.*micro_batch_size"):
        qlora_lite.train(tiny_model, INSTRUCTION_ROWS, tmp_path / "run", max_steps=0, micro_batch_size=-1)
    with pytest.raises(UserError, match="not found"):
        qlora_lite.train(str(tmp_path / "no-such-model"), INSTRUCTION_ROWS, tmp_path / "run")


def test_long_examples_are_truncated_and_counted(tiny_model, tmp_path):
    long_prompts = [{"instruction": "Repeat: " + "fox " * 200, "output": "fox"} for _ in range(4)]
    long_answers = [{"instruction": "Repeat fox", "output": "fox " * 200} for _ in range(4)]
    rows = long_prompts + long_answers + INSTRUCTION_ROWS[:8]
    result = qlora_lite.train(
        tiny_model, rows, tmp_path / "run", max_seq_length=64, eval_fraction=0.0, **{**FAST, "max_steps": 1}
    )
    record = json.loads(result.run_record.read_text())
    assert record["data"]["truncated_examples"] == 8  # every long one is cut at 64 tokens, none fails the run
    assert (
        record["data"]["dropped_examples"] == 4
    )  # the prompt filled all 64 tokens: no response left to learn
    assert record["data"]["train_examples"] == 12
    assert record["plan"]["max_seq_length"] == 64


def test_16bit_lora_when_quantization_is_none(tiny_model, tmp_path):
    snap = Snapshot()
    result = qlora_lite.train(
        tiny_model, INSTRUCTION_ROWS, tmp_path / "run", quantization="none", callbacks=[snap], **FAST
    )
    assert not getattr(snap.model.get_base_model(), "is_loaded_in_4bit", False)
    assert result.plan.quantization == "none"
    for key, value in snap.model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, snap.state_before[key]), key
    assert json.loads(result.run_record.read_text())["quantization"]["method"] == "none"


def test_plan_is_shown_in_a_plain_script(tiny_model, tmp_path):
    """A notebook or script with no logging set up still sees the plan (the library adds one handler)."""
    import subprocess
    import sys

    code = (
        "import qlora_lite, json; rows=[{'instruction': f'Say {i}', 'output': f'It is {i}.'} for i in range(8)];"
        f"qlora_lite.train({tiny_model!r}, rows, {str(tmp_path / 'run')!r}, max_steps=1, progress=False, lora_r=4)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plan for detected" in done.stderr and "micro_batch_size" in done.stderr


def test_held_out_generations_before_and_after_match_separately_loaded_models(tiny_model, tmp_path):
    from qlora_lite.inference.generation import Generator

    result = qlora_lite.train(
        tiny_model,
        INSTRUCTION_ROWS,
        tmp_path / "run",
        eval_fraction=0.25,
        eval_generations=4,
        **{**FAST, "max_steps": 4},
    )
    gen = json.loads(result.run_record.read_text())["generation_eval"]
    assert gen["examples"] == 4 and len(gen["samples"]) == 3
    for part in ("before", "after"):
        assert 0.0 <= gen[part]["exact_match"] <= gen[part]["contains_match"] <= 1.0
    held_out = {row["instruction"]: row["output"] for row in INSTRUCTION_ROWS}
    prompts = [s["prompt"] for s in gen["samples"]]
    assert [s["expected"] for s in gen["samples"]] == [held_out[p] for p in prompts]
    # "before" is the base model (adapter switched off), "after" the trained adapter: the same answers as
    # loading each on its own.
    base = Generator(model=tiny_model)(prompts, max_new_tokens=gen["max_new_tokens"])
    tuned = Generator(result.adapter_dir)(prompts, max_new_tokens=gen["max_new_tokens"])
    assert [s["before"] for s in gen["samples"]] == base
    assert [s["after"] for s in gen["samples"]] == tuned


def test_a_micro_batch_that_does_not_divide_the_step_gives_the_same_training(tiny_model, tmp_path):
    """Effective batch 8 as micro-batches 3+3+2 updates exactly like one micro-batch of 8 (the planner may pick 3)."""
    settings = {**FAST, "max_steps": 3, "effective_batch_size": 8, "lora_dropout": 0.0}
    whole = qlora_lite.train(
        tiny_model, INSTRUCTION_ROWS, tmp_path / "whole", **{**settings, "micro_batch_size": 8}
    )
    split = qlora_lite.train(
        tiny_model, INSTRUCTION_ROWS, tmp_path / "split", **{**settings, "micro_batch_size": 3}
    )
    assert split.plan.gradient_accumulation_steps == 3
    assert split.metrics["examples_seen"] == whole.metrics["examples_seen"]
    a = load_file(whole.output_dir / "adapter_model.safetensors")
    b = load_file(split.output_dir / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
