"""Chat templates (`chat_template=`: the tokenizer's own, chatml / llama3 / gemma, a Jinja file) and stopping at
the end-of-turn the model learned when it is not the model's EOS (Qwen2.5 base: `<|im_end|>` vs `<|endoftext|>`)."""

from __future__ import annotations

import json

import pytest
import torch
from models_util import _config
from tokenizers_util import build_tiny_tokenizer

from qlora_lite.data.templates import (
    apply_chat_template_choice,
    end_of_turn,
    stop_strings,
    stop_token_ids,
)
from qlora_lite.errors import UserError

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."


def eos_differs_tokenizer():
    """The tiny tokenizer with <|endoftext|> as EOS, like Qwen2.5 base: <|im_end|> is only the end of a turn."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    return tokenizer


@pytest.mark.parametrize(
    "choice, marker", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>")]
)
def test_named_templates_and_their_end_of_turn(choice, marker):
    tokenizer = build_tiny_tokenizer()
    assert apply_chat_template_choice(tokenizer, choice) == choice
    assert end_of_turn(tokenizer) == marker
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert f"yo{marker}" in rendered


def test_a_jinja_file_and_wrong_choices(tmp_path):
    tokenizer = build_tiny_tokenizer()
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} <END>\n{% endfor %}")
    assert apply_chat_template_choice(tokenizer, str(path)) == "t.jinja"
    assert end_of_turn(tokenizer) == "<END>"
    assert stop_strings(tokenizer) == ["<END>"]  # several tokens here: cut from answers after generation
    with pytest.raises(UserError, match="neither one of chatml, llama3, gemma nor a Jinja file"):
        apply_chat_template_choice(tokenizer, "vicuna")
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(UserError, match="drops the assistant's message"):
        apply_chat_template_choice(tokenizer, str(path))


def test_stop_tokens_are_eos_plus_end_of_turn():
    tokenizer = eos_differs_tokenizer()
    apply_chat_template_choice(tokenizer, None)  # no template of its own: the ChatML fallback
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, im_end]
    assert tokenizer.eos_token_id != im_end


def test_a_model_whose_eos_differs_stops_at_the_end_of_turn_it_learned(tmp_path):
    """Trained on ChatML (end of turn <|im_end|>) with EOS <|endoftext|>: generation stops after the answer in
    qlora_lite.generate, in the exact-match evaluation, and with plain transformers + PEFT given the run's
    generation_config.json; without the end-of-turn stop token the same model runs on past its answer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import qlora_lite

    tokenizer = eos_differs_tokenizer()
    config = _config("qwen2", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    assert (
        json.loads((base_dir / "generation_config.json").read_text())["eos_token_id"]
        == tokenizer.eos_token_id
    )

    rows = [{"instruction": QUESTION, "output": ANSWER}] * 8
    result = qlora_lite.train(
        str(base_dir), rows, str(tmp_path / "run"), max_steps=80, learning_rate=1e-2, lora_r=8, eval_every=80,
        quantization="none", micro_batch_size=4, effective_batch_size=4, eval_generations=1,
        sample_generations=0, progress=False, lr_scheduler="constant",
    )  # fmt: skip
    run = result.output_dir
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    saved = json.loads((run / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tokenizer.eos_token_id, im_end]
    record = json.loads(result.run_record.read_text())
    assert record["chat_template"]["end_of_turn"] == "<|im_end|>"
    assert result.metrics["exact_match"] == 1.0  # the held-out answer, generated and compared whole

    assert qlora_lite.generate(QUESTION, adapter=str(run), max_new_tokens=40) == ANSWER

    # plain transformers + PEFT, with the run's generation_config.json
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run)).eval()
    run_tokenizer = AutoTokenizer.from_pretrained(run)
    prompt = run_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        stopped = model.generate(
            **prompt,
            generation_config=GenerationConfig.from_pretrained(run),
            max_new_tokens=40,
            do_sample=False,
        )[0, prompt["input_ids"].shape[1] :]
        runs_on = model.generate(
            **prompt, eos_token_id=tokenizer.eos_token_id, max_new_tokens=40, do_sample=False
        )[0, prompt["input_ids"].shape[1] :]
    assert stopped[-1].item() == im_end
    assert run_tokenizer.decode(stopped, skip_special_tokens=True).strip() == ANSWER
    assert len(runs_on) > len(stopped) and im_end in runs_on.tolist()  # the learned marker, then more text
