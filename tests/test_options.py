"""Each option declared once: TrainConfig, the CLI flags, the planner's knobs, resume and the card derive from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from qlora_lite import options
from qlora_lite.cli import classify as classify_cli
from qlora_lite.cli import plan as plan_cli
from qlora_lite.cli import train as train_cli
from qlora_lite.cli.flags import settings_from_args
from qlora_lite.cli.main import build_parser, main
from qlora_lite.config import TrainConfig, make_config
from qlora_lite.errors import UserError
from qlora_lite.hub.card import setting_rows
from qlora_lite.planner.planning import KNOBS

PARSERS = {"train": train_cli, "plan": plan_cli, "train-classifier": classify_cli}
REQUIRED = {
    "train": ["--model", "m", "--data", "d", "--output", "o"],
    "plan": ["--model", "m"],
    "train-classifier": ["--model", "m", "--data", "d", "--output", "o"],
}
SAMPLE = {int: "3", float: "0.25", str: None}


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    PARSERS[command].add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args([command, *REQUIRED[command], *argv])


def test_train_config_has_exactly_the_declared_options():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert fields == [
        "model",
        "data",
        "output_dir",
        *options.names(options.OPTIONS),
        "hardware",
        "progress",
        "callbacks",
    ]
    config = TrainConfig("m", "d", "o")
    assert all(getattr(config, o.name) == o.default for o in options.OPTIONS)
    assert set(config.to_record()["settings"]) == set(options.BY_NAME)


def test_each_command_has_a_flag_for_each_of_its_options_and_reads_it_back():
    for command, module in PARSERS.items():
        declared = options.for_command(command)
        assert declared, command
        for option in declared:
            if option.action:
                argv, expected = [option.cli_flag], option.action == "store_true"
            elif option.choices:
                argv, expected = [option.cli_flag, str(option.choices[-1])], option.choices[-1]
            elif option.parse is options.on_off:
                argv, expected = [option.cli_flag, "off"], False
            elif option.parse is options.modules_arg:
                argv, expected = [option.cli_flag, "q_proj,v_proj"], ["q_proj", "v_proj"]
            elif option.parse is options.columns_arg:
                argv, expected = [option.cli_flag, "output=answer"], {"output": "answer"}
            elif option.parse is options.pattern_arg:
                argv, expected = [option.cli_flag, "down_proj=8"], {"down_proj": 8}
            else:
                text = SAMPLE.get(option.parse) or "x"
                argv, expected = [option.cli_flag, text], option.parse(text)
            args = _parse(command, argv)
            assert settings_from_args(args, command) == {option.name: expected}, (command, option.name)
        # Flags of options declared for other commands only are not there.
        others = {o.cli_flag for o in options.OPTIONS} - {o.cli_flag for o in declared}
        with pytest.raises(SystemExit):
            _parse(command, [sorted(others)[0], "1"]) if others else _parse(command, ["--no-such-flag"])
        assert module.COMMANDS


def test_planner_knobs_are_the_declared_ones_and_the_plan_flags_are_the_knobs():
    assert set(KNOBS) == set(options.PLANNER_KNOBS) | {"task", "num_labels", "peft", "world_size", "fsdp"}
    sources = {"model_revision", "data_config", "data_split"}  # where the model and data come from
    peft = set(options.PEFT_OPTIONS) - {
        "lora_alpha",
        "lora_dropout",
    }  # the plan's "peft" knob is made of them
    assert {o.name for o in options.for_command("plan")} == set(options.PLANNER_KNOBS) | sources | peft
    # Resume: what must match and what a resumed run keeps did not change with the declaration.
    assert set(options.IDENTITY_SETTINGS) == {
        "max_steps", "epochs", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
        "seed", "eval_fraction", "train_on", "lora_alpha", "lora_dropout", "format", "chat_template", "data_config",
        "data_split", "warmup_steps", "eval_data", "early_stopping_patience", "keep_best",
    }  # fmt: skip
    assert set(options.KEPT_ON_RESUME) == {
        "quantization", "double_quant", "compute_dtype", "effective_batch_size", "max_seq_length",
        "gradient_checkpointing", "optimizer", "attn_implementation", "lora_r", "lora_target_modules",
        "packing", "chunked_loss", "precision",  # [13]: checkpoints from before them: off / upcast
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", *REQUIRED["train"], "--max-steps", "0"], "--max-steps must be >= 1 (got 0)"),
        (["train", *REQUIRED["train"], "--micro-batch-size", "0"], "--micro-batch-size must be a positive integer"),
        (["train-classifier", *REQUIRED["train-classifier"], "--learning-rate", "3"], "--learning-rate must be in (0, 1)"),
        (["plan", *REQUIRED["plan"], "--lora-r", "-2"], "--lora-r must be a positive integer (got -2)"),
        (["train", *REQUIRED["train"], "--eval-fraction", "0.7", "--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    ],
)  # fmt: skip
def test_cli_mistakes_name_the_flag_as_typed_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    if "--eval-fraction" in argv:
        assert "--eval-fraction must be in [0, 0.5)" in err


def test_python_api_mistakes_name_the_setting():
    with pytest.raises(
        UserError, match=r"lr_scheduler must be one of cosine.*\(got 'cosin'\); warmup_ratio must be >= 0"
    ):
        make_config("m", "d", "o", lr_scheduler="cosin", warmup_ratio=-0.1)
    with pytest.raises(UserError, match="gradient_checkpointing must be True or False"):
        make_config("m", "d", "o", gradient_checkpointing="yes")


def test_every_help_text_is_there_and_the_parser_builds():
    assert all(o.help for o in options.OPTIONS)
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--lr-scheduler" in text and "(default: cosine)" in text and "planner knobs" in text


def test_model_card_rows_follow_the_declaration():
    record = {
        "plan": {"quantization": "nf4", "lora_r": 8, "optimizer": "paged_adamw_8bit", "max_seq_length": 512},
        "hyperparameters": {
            "learning_rate": 1e-4,
            "lr_scheduler": "cosine",
            "lora_alpha": None,
            "lora_dropout": 0.1,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
    }
    rows = dict(setting_rows(record))
    assert [label for label, _ in setting_rows(record)] == [o.card for o in options.OPTIONS if o.card]
    assert rows["LoRA rank"] == 8 and rows["LoRA alpha"] == 16 and rows["optimizer"] == "paged_adamw_8bit"
    assert rows["learning rate"] == 1e-4 and rows["LoRA dropout"] == 0.1


def test_peft_options_reach_peft_through_the_plan(tiny_model):
    """Options declared with `peft=` build the PeftSettings the planner sees and attach_lora applies."""
    from qlora_lite.model.loading import attach_lora, load_base_model
    from qlora_lite.model.peft_methods import PeftSettings
    from qlora_lite.planner.planning import plan

    config = make_config("m", "d", "o", rslora=True, lora_method="dora", lora_alpha=8, lora_dropout=0.0)
    settings = config.peft_settings()
    assert (settings.rslora, settings.lora_method, settings.alpha, settings.dropout) == (True, "dora", 8, 0.0)
    the_plan = plan(tiny_model, hardware="cpu", lora_r=4, **{k: v for k, v in config.fixed_knobs().items()})
    planned = PeftSettings.from_record(the_plan.peft)
    assert planned.r == 4 and planned.rslora and planned.lora_method == "dora"
    base = load_base_model(
        tiny_model, quantization="none", double_quant=False, compute_dtype="fp32", accelerator="cpu"
    )
    model = attach_lora(base, planned, gradient_checkpointing=False)
    peft_config = model.peft_config["default"]
    assert peft_config.use_rslora is True and peft_config.use_dora is True and peft_config.lora_alpha == 8
    # The CLI: the flags and the alias land on the same options.
    args = _parse("train", ["--rslora", "--target-modules", "attention", "--lora-method", "dora"])
    assert settings_from_args(args, "train") == {
        "rslora": True, "lora_target_modules": "attention", "lora_method": "dora"
    }  # fmt: skip
    # Set PEFT options join the run identity; at their defaults they leave it as it was before they existed.
    assert set(options.IDENTITY_SETTINGS_IF_SET) == set(options.PEFT_OPTIONS) - {"lora_alpha", "lora_dropout"}
