"""`qlora-lite plan`: predict memory and choose the knobs before downloading a single weight."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from qlora_lite.cli.flags import add_option_flags, settings_from_args
from qlora_lite.config import peft_settings
from qlora_lite.options import PLAN, planner_settings

LengthsFn = Callable[..., list[int]]


def add_plan_parser(subparsers: Any) -> None:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="predict peak memory and choose quantization, batch, sequence length, checkpointing, optimizer",
        description="Plan a run from a model folder holding only config.json; every knob can be fixed.",
    )
    p.add_argument(
        "--model",
        help="model folder (config.json is enough), config.json, or a Hub id org/name[@revision] "
        "(only its config.json is fetched)",
    )
    p.add_argument(
        "--gpu", "--hardware", dest="gpu", default=None, help="named profile (t4, a100-80gb, cpu, ...)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="training data file or Hub data set org/name: the sequence length follows its token lengths",
    )
    add_option_flags(p, PLAN)
    # How many processes train together: an input of the plan, not a setting of a run (torchrun decides it).
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="processes training together (torchrun --nproc_per_node N): the plan is per device",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="shard weights, LoRA and optimizer over the N devices (FSDP-QLoRA, docs/distributed.md)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


add_parsers = add_plan_parser


def run_plan(args: argparse.Namespace, lengths_from_data: LengthsFn | None = None) -> int:
    """Print the plan (table, or one JSON object with --json). A plan that does not fit still exits 0."""
    from qlora_lite.model.source import resolve_model_source
    from qlora_lite.planner.planning import plan

    given = settings_from_args(args, PLAN)
    fixed = {**planner_settings(given), "peft": peft_settings(given)}
    fixed.update({k: getattr(args, k) for k in ("world_size", "fsdp") if getattr(args, k, None) is not None})
    # A Hub id: its config.json only, pinned to a commit.
    model = resolve_model_source(args.model, given.get("model_revision"))
    lengths = None
    if getattr(args, "data", None):
        from qlora_lite.data.encoding import token_lengths
        from qlora_lite.data.hub_dataset import pin_data_source

        data = pin_data_source(args.data, given.get("data_config"), given.get("data_split"))
        lengths = (lengths_from_data or token_lengths)(data, model)
    the_plan = plan(model, data=lengths, hardware=getattr(args, "gpu", None), **fixed)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(the_plan.to_dict(), sort_keys=True) + "\n")
    else:
        sys.stdout.write(the_plan.explain() + "\n")
    return 0


COMMANDS = {"plan": run_plan}
