"""Command-line flags derived from the options declaration (qlora_lite.options), and reading them back.

`add_option_flags(parser, command)` adds one flag per option that applies to `command`; `settings_from_args`
returns the ones the user gave, checked with the flag named as typed (`--max-steps must be >= 1 (got 0)`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.options import (  # noqa: F401 (re-exported: the value parsers lived here)
    PLANNER_KNOBS,
    Option,
    columns_arg,
    for_command,
    modules_arg,
    on_off,
    pattern_arg,
)

_PLANNER_GROUP = "planner knobs (unset: the planner chooses and explains)"


def _add(target: Any, option: Option) -> None:
    kwargs: dict[str, Any] = {"dest": option.name, "default": None}
    help_text = option.help
    if option.action:
        kwargs["action"] = option.action
    else:
        kwargs["type"] = option.parse
        if option.choices is not None:
            kwargs["choices"] = option.choices
        if option.metavar:
            kwargs["metavar"] = option.metavar
        if option.default is not None:
            help_text += f" (default: {option.default})"
    target.add_argument(option.cli_flag, *option.aliases, help=help_text, **kwargs)


def add_option_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per option declared for `command` ("train", "plan", "train-classifier"); unset = None.
    `--config recipe.yaml` gives any of them (and the model, data, output) from a file; flags win."""
    parser.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        help="a YAML recipe: every option as a key (Hugging Face names accepted); flags override it",
    )
    options = for_command(command)
    settings = parser.add_argument_group("settings") if command != "plan" else None
    knobs = parser.add_argument_group(_PLANNER_GROUP)
    peft = parser.add_argument_group("PEFT method (unset: LoRA)")
    for option in options:
        _add(
            peft
            if option.peft and not option.name.startswith("lora_")
            else knobs
            if option.planner or settings is None
            else settings,
            option,
        )


# The place flags of the training commands and the recipe keys that fill them.
_PLACES = (("model", "model", "--model"), ("data", "data", "--data"), ("output", "output_dir", "--output"))


def settings_from_args(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options the user gave for `command` — on the command line, over the `--config` recipe's — each
    checked (UserError naming the flag as typed, or the recipe file and key). The recipe's model, data and
    output fill `args.model` / `args.data` / `args.output` where no flag was given."""
    from qlora_lite.recipe import apply_recipe

    given = {
        o.name: getattr(args, o.name) for o in for_command(command) if getattr(args, o.name, None) is not None
    }
    problems = [
        p for o in for_command(command) if o.name in given and (p := o.problem(given[o.name], o.cli_flag))
    ]
    if problems:
        raise UserError("; ".join(problems))
    # `plan` sizes the sequence length from --data when given, but not from a training recipe's data, which
    # may be a Hub data set or a file on another machine: a recipe plans from the model alone.
    places_of = [p for p in _PLACES if hasattr(args, p[0]) and not (command == "plan" and p[0] == "data")]
    present = {key: getattr(args, dest) for dest, key, _ in places_of}
    places, settings = apply_recipe(getattr(args, "config", None), present, given, command)
    for dest, key, flag in places_of:
        value = places[key]
        setattr(args, dest, None if value is None else str(value))
        if value is None:
            raise UserError(f"{flag} is required (or `{key}:` in the --config recipe)")
    return settings


def print_result(result) -> None:
    """A finished (or resumed) run's folder and metrics as one JSON object on stdout."""
    summary = {"output_dir": str(result.output_dir), "resumed_from_step": result.resumed_from_step}
    print(json.dumps({**summary, **result.metrics}, indent=2))
