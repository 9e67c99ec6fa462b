"""AdapterSet: many adapters on one loaded base, per-row switching, refusals, streaming, classification."""

from __future__ import annotations

import json

import pytest
import torch
from adapters_util import make_adapter

import qlora_lite
from qlora_lite.data.encoding import prompt_ids
from qlora_lite.errors import UserError
from qlora_lite.inference.adapters import AdapterSet, Completion
from qlora_lite.inference.router import Router

PROMPTS = ["What is the capital of France?", "Tell me a joke about cats and dogs", "1 2 3 4 5 6 7 8"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models["llama"]
    return {
        "a": make_adapter(base, root / "a", seed=1),
        "b": make_adapter(base, root / "b", seed=2, r=8, targets=("q_proj", "v_proj", "up_proj")),
        "other": make_adapter(tiny_models["qwen2"], root / "other", seed=3),
    }


def _base(path: str, quantization: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    from qlora_lite.compat import keep_4bit_weights_differentiable

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kwargs).eval()
    keep_4bit_weights_differentiable(model)  # the kernel qlora_lite runs on every CPU (qlora_lite.compat)
    return model


def _ids(tokenizer, prompts=PROMPTS) -> torch.Tensor:
    rows = [tokenizer(p)["input_ids"][:3] for p in prompts]
    return torch.tensor(rows)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_switching_equals_separately_loaded_peft_models(tiny_model, adapter_dirs, quantization):
    from peft import PeftModel

    adapters = AdapterSet(
        tiny_model, {"one": adapter_dirs["a"], "two": adapter_dirs["b"]}, quantization=quantization
    )
    assert adapters.names == ["one", "two"]
    ids = _ids(adapters.tokenizer)
    got = {step: adapters.logits(ids, name) for step, name in enumerate(["one", "two", "one", None])}
    with torch.no_grad():
        expected_a = PeftModel.from_pretrained(_base(tiny_model, quantization), adapter_dirs["a"])(ids).logits
        expected_b = PeftModel.from_pretrained(_base(tiny_model, quantization), adapter_dirs["b"])(ids).logits
        plain = _base(tiny_model, quantization)(ids).logits
    assert torch.equal(got[0], expected_a) and torch.equal(got[2], expected_a)  # A -> B -> A: exact
    assert torch.equal(got[1], expected_b)
    assert torch.equal(got[3], plain)  # adapter=None is the plain base
    assert not torch.allclose(expected_a, plain, atol=1e-3) and not torch.allclose(
        expected_b, plain, atol=1e-3
    )


def test_mixed_batch_equals_each_adapter_alone(tiny_model, adapter_dirs):
    adapters = AdapterSet(tiny_model, {"one": adapter_dirs["a"], "two": adapter_dirs["b"]})
    ids = _ids(adapters.tokenizer)
    mixed = adapters.logits(ids, ["one", "two", None])
    for row, name in enumerate(["one", "two", None]):
        torch.testing.assert_close(mixed[row], adapters.logits(ids, name)[row], rtol=0, atol=1e-5)
    texts = adapters.generate(PROMPTS, ["one", "two", "base"], max_new_tokens=8)
    alone = [
        adapters.generate(PROMPTS, name, max_new_tokens=8)[row]
        for row, name in enumerate(["one", "two", None])
    ]
    assert texts == alone
    assert len({c.text for c in texts}) == 3, "each adapter answers differently"
    assert all(isinstance(c, Completion) and c.prompt_tokens > 0 for c in texts)
    assert all(c.finish_reason in ("stop", "length") and 0 < c.completion_tokens <= 8 for c in texts)


def test_generate_equals_the_generator_of_a_trained_run(tiny_model, tmp_path):
    rows = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(8)]
    fast = dict(max_steps=2, effective_batch_size=4, micro_batch_size=2, progress=False, lora_r=4, seed=7)
    run = qlora_lite.train(tiny_model, rows, tmp_path / "run", learning_rate=5e-3, **fast).adapter_dir
    chat = [{"role": "user", "content": "Say the number 3"}]
    expected = qlora_lite.Generator(run)(["Say the number 3", chat], max_new_tokens=10)
    adapters = AdapterSet(adapters={"numbers": str(run)})  # base and quantization from the run record
    assert adapters.base_id == tiny_model and adapters.quantization == "nf4"
    got = adapters.generate(["Say the number 3", chat], "numbers", max_new_tokens=10)
    assert [c.text for c in got] == expected
    base = qlora_lite.Generator(model=tiny_model)("Say the number 3", max_new_tokens=10)
    assert adapters.generate(["Say the number 3"], max_new_tokens=10)[0].text == base
    info = adapters.info("numbers")
    assert info["task"] == "causal_lm" and info["rank"] == 4 and info["quantization"] == "nf4"
    # The run keeps a sample of its training prompts, so a router can tell its domain without the data file.
    assert "Say the number" in json.loads((run / "run_record.json").read_text())["router_sample"][0]
    assert Router.from_adapters({"numbers": run}).route("Say the number 12").adapter == "numbers"


def test_refusals_name_the_reason(tiny_model, adapter_dirs):
    adapters = AdapterSet(tiny_model, {"one": adapter_dirs["a"]}, quantization="none")
    with pytest.raises(UserError, match="already loaded"):
        adapters.load("one", adapter_dirs["b"])  # PEFT itself would silently overwrite the weights
    with pytest.raises(UserError, match="another base"):
        adapters.load("other", adapter_dirs["other"])
    with pytest.raises(UserError, match="not usable"):
        adapters.load("base", adapter_dirs["b"])
    with pytest.raises(UserError, match="no adapter named 'zz'"):
        adapters.generate(["hi"], "zz")
    with pytest.raises(UserError, match="2 adapter names for 1 prompts"):
        adapters.generate(["hi"], ["one", "one"])
    assert adapters.names == ["one"]
    with pytest.raises(UserError, match="prefix"):
        adapters.load("or", adapter_dirs["b"])
    adapters.load("two", adapter_dirs["b"])
    adapters.unload("one")
    assert adapters.names == ["two"]
    with pytest.raises(UserError, match="no adapter named 'one'"):
        adapters.generate(["hi"], "one")
    adapters.load("one", adapter_dirs["a"])  # the name is free again
    assert adapters.generate(["hi"], "one", max_new_tokens=3)[0].completion_tokens > 0


def test_stream_joins_to_generate_and_stop_strings_cut(tiny_model, adapter_dirs):
    adapters = AdapterSet(tiny_model, {"one": adapter_dirs["a"]}, quantization="none")
    full = adapters.generate(PROMPTS[:1], "one", max_new_tokens=16)[0]
    pieces = list(adapters.stream(PROMPTS[0], "one", max_new_tokens=16))
    assert "".join(pieces) == full.text and len(pieces) > 1
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    cut = adapters.generate(PROMPTS[:1], "one", max_new_tokens=16, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)].strip()
    assert cut.completion_tokens < full.completion_tokens
    assert "".join(adapters.stream(PROMPTS[0], "one", max_new_tokens=16, stop=[stop])) == cut.text


def test_run_folder_end_token_stops_generation(tiny_model, adapter_dirs, tmp_path):
    import shutil

    folder = tmp_path / "a-eot"
    shutil.copytree(adapter_dirs["a"], folder)
    adapters = AdapterSet(tiny_model, {"one": adapter_dirs["a"]}, quantization="none")
    prompt = prompt_ids("1 2 3", adapters.tokenizer)
    ids = adapters.model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, adapter_names=["one"]
    )[0].tolist()
    third = ids[len(prompt) + 2]  # a token the adapter produces, standing in for a learned end-of-turn token
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [third]}))
    adapters.load("eot", str(folder))
    plain = adapters.generate(["1 2 3"], "one", max_new_tokens=6)[0]
    ended = adapters.generate(["1 2 3"], "eot", max_new_tokens=6)[0]
    assert ended.finish_reason == "stop" and ended.completion_tokens < plain.completion_tokens


def test_classifier_adapter_answers_classify_on_the_shared_base(tiny_model, adapter_dirs, tmp_path):
    from qlora_lite.inference.classification import load_classifier
    from qlora_lite.training.api import train_classifier

    rows = [
        {"text": f"I {w} thing {i}", "label": lab}
        for i in range(6)
        for lab, w in (("pos", "love"), ("neg", "hate"))
    ]
    fast = dict(max_steps=2, effective_batch_size=4, micro_batch_size=2, progress=False, lora_r=4, seed=3)
    run = train_classifier(tiny_model, rows, str(tmp_path / "cls"), eval_fraction=0.25, **fast).output_dir
    adapters = AdapterSet(tiny_model, {"gen": adapter_dirs["a"], "sentiment": str(run)})
    texts = ["I love thing 9", "I hate it", "thing"]
    got = adapters.classify(texts, "sentiment")
    expected = load_classifier(run).predict(texts)
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
    assert adapters.info("sentiment")["task"] == "classification"
    assert adapters.info("sentiment")["labels"] == ["neg", "pos"]
    with pytest.raises(UserError, match="classifier"):
        adapters.generate(["hi"], "sentiment")
    with pytest.raises(UserError, match="not a classifier"):
        adapters.classify(texts, "gen")
    before = adapters.generate(PROMPTS, ["gen", None, "gen"], max_new_tokens=5)
    assert adapters.generate(PROMPTS, ["gen", None, "gen"], max_new_tokens=5) == before
