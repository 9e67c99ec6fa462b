"""YAML recipes: HF/TRL/Axolotl names as aliases, errors that name the file and line, flags override."""

from __future__ import annotations

import pytest

from qlora_lite.errors import UserError
from qlora_lite.recipe import dump_recipe, load_recipe, merge

KNOWN = (
    "epochs", "max_steps", "micro_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
    "warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm", "optimizer", "compute_dtype",
    "gradient_checkpointing", "max_seq_length", "save_every_steps", "keep_checkpoints", "eval_every", "seed",
    "quantization", "double_quant", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)  # fmt: skip


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_hugging_face_names_mean_the_same_as_ours(tmp_path):
    path = write(
        tmp_path,
        "model_name_or_path: org/model\ndataset: train.jsonl\noutput_dir: runs/x\nnum_train_epochs: 2\n"
        "max_steps: 30\nper_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nlearning_rate: 1.0e-4\n"
        "lr_scheduler_type: linear\nwarmup_ratio: 0.1\nweight_decay: 0.01\nmax_grad_norm: 0.5\n"
        "optim: paged_adamw_8bit\nbf16: true\nfp16: false\ngradient_checkpointing: false\nmax_length: 256\n"
        "save_steps: 10\nsave_total_limit: 3\neval_steps: 5\nseed: 7\nload_in_4bit: true\n"
        "bnb_4bit_quant_type: nf4\nbnb_4bit_use_double_quant: false\nr: 8\nlora_alpha: 16\nlora_dropout: 0.0\n"
        "target_modules: [q_proj, v_proj]\n",
    )
    assert load_recipe(path, KNOWN) == {
        "model": "org/model", "data": "train.jsonl", "output_dir": "runs/x", "epochs": 2, "max_steps": 30,
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-4, "lr_scheduler": "linear",
        "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 0.5, "optimizer": "paged_adamw_8bit",
        "compute_dtype": "bf16", "gradient_checkpointing": False, "max_seq_length": 256, "save_every_steps": 10,
        "keep_checkpoints": 3, "eval_every": 5, "seed": 7, "quantization": "nf4", "double_quant": False,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"],
    }  # fmt: skip


def test_an_unknown_key_names_the_file_the_line_and_the_closest_key(tmp_path):
    path = write(tmp_path, "max_steps: 3\n# a comment\nlerning_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        load_recipe(path, KNOWN)
    assert str(err.value) == f"{path} line 3: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"


def test_two_keys_for_one_option_that_disagree_are_refused(tmp_path):
    path = write(tmp_path, "max_length: 256\nmax_seq_length: 512\n")
    with pytest.raises(
        UserError, match="line 2: 'max_seq_length' sets max_seq_length to 512, but 'max_length'"
    ):
        load_recipe(path, KNOWN)
    assert load_recipe(write(tmp_path, "max_length: 256\nmax_seq_length: 256\n"), KNOWN) == {
        "max_seq_length": 256
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim: sgd\n", "line 1 (optim): optimizer 'sgd' is not one of adamw_torch"),
        ("bnb_4bit_quant_type: fp4\n", "only nf4 4-bit quantization is supported"),
        ("bf16: yes please\n", "line 1 (bf16): expected true or false"),
        ("max_steps: [1\n", "not valid YAML"),
        ("- a\n- b\n", "a recipe is a mapping of option: value, got a list"),
    ],
)
def test_bad_values_and_bad_yaml_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_recipe(write(tmp_path, text), KNOWN)


def test_missing_and_non_utf8_recipes(tmp_path):
    with pytest.raises(UserError, match="recipe .*nope.yaml not found: check the path given to --config"):
        load_recipe(tmp_path / "nope.yaml", KNOWN)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_recipe(bad, KNOWN)


def test_flags_override_the_recipe_and_the_dump_reads_back(tmp_path):
    recipe = {"max_steps": 30, "learning_rate": 1e-4, "lora_target_modules": ("q_proj",)}
    merged = merge(recipe, {"max_steps": 5, "learning_rate": None})
    assert merged == {"max_steps": 5, "learning_rate": 1e-4, "lora_target_modules": ("q_proj",)}
    path = write(tmp_path, dump_recipe(merged))
    assert load_recipe(path, KNOWN) == {**merged, "lora_target_modules": ["q_proj"]}
