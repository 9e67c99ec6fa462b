"""`qlora-lite plan`: predict memory and choose the knobs before downloading a single weight."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from qlora_lite.cli.flags import add_peft_flags, peft_from_args
from qlora_lite.model.peft_methods import TARGET_PRESETS
from qlora_lite.planner.memory import ATTENTION, COMPUTE_DTYPES, OPTIMIZER_STATE_BYTES, QUANTIZATIONS

LengthsFn = Callable[..., list[int]]


def _on_off(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"on", "true", "yes", "1"}:
        return True
    if lowered in {"off", "false", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _targets(value: str) -> str | list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give module names separated by commas, or all-linear")
    return names[0] if len(names) == 1 and names[0] in TARGET_PRESETS else names


def add_plan_parser(subparsers: Any) -> None:
    """Add the `plan` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="predict peak memory and choose quantization, batch, sequence length, checkpointing, optimizer",
        description="Plan a run from a model folder holding only config.json; every knob can be fixed.",
    )
    p.add_argument(
        "--model",
        required=True,
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
    from qlora_lite.cli.flags import add_hub_source_flags

    add_hub_source_flags(p)
    p.add_argument("--max-memory", default=None, help="memory budget, e.g. 14.5GiB, 16GB, 800MB")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--gradient-accumulation-steps", type=int, default=None)
    p.add_argument("--effective-batch-size", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--gradient-checkpointing", type=_on_off, default=None, metavar="on|off")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None)
    p.add_argument("--double-quant", type=_on_off, default=None, metavar="on|off")
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument(
        "--lora-target-modules", "--target-modules", dest="lora_target_modules", type=_targets, default=None,
        metavar="all-linear|attention|mlp|a,b,...",
    )  # fmt: skip
    p.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE_BYTES), default=None)
    p.add_argument("--compute-dtype", choices=tuple(COMPUTE_DTYPES), default=None)
    p.add_argument("--attn-implementation", choices=ATTENTION, default=None)
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
    add_peft_flags(p)


_KNOBS = (
    "max_memory",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "max_seq_length",
    "gradient_checkpointing",
    "quantization",
    "double_quant",
    "lora_r",
    "lora_target_modules",
    "optimizer",
    "compute_dtype",
    "attn_implementation",
    "world_size",
    "fsdp",
)


def run_plan(args: argparse.Namespace, lengths_from_data: LengthsFn | None = None) -> int:
    """Print the plan (table, or one JSON object with --json). A plan that does not fit still exits 0."""
    from qlora_lite.model.source import resolve_model_source
    from qlora_lite.planner.planning import plan

    fixed: dict[str, Any] = {}
    for name in _KNOBS:
        value = getattr(args, name, None)
        if value is not None:
            fixed[name] = value
    # A Hub id: its config.json only, pinned to a commit.
    model = resolve_model_source(args.model, getattr(args, "model_revision", None))
    lengths = None
    if getattr(args, "data", None):
        from qlora_lite.data.encoding import token_lengths
        from qlora_lite.data.hub_dataset import pin_data_source

        data = pin_data_source(
            args.data, getattr(args, "data_config", None), getattr(args, "data_split", None)
        )
        lengths = (lengths_from_data or token_lengths)(data, model)
    fixed["peft"] = peft_from_args(args)
    the_plan = plan(model, data=lengths, hardware=getattr(args, "gpu", None), **fixed)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(the_plan.to_dict(), sort_keys=True) + "\n")
    else:
        sys.stdout.write(the_plan.explain() + "\n")
    return 0
