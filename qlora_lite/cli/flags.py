"""The flags every training command shares (schedule, LoRA, checkpoints, planner knobs) and their parsers."""

from __future__ import annotations

import argparse
import json

from qlora_lite.model.peft_methods import INITS, LORA_METHODS, METHODS, TARGET_PRESETS, PeftSettings


def on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def columns_arg(value: str) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"}."""
    mapping = {}
    for pair in value.split(","):
        role, sep, column = pair.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise argparse.ArgumentTypeError(
                f"--columns wants ROLE=COLUMN pairs like output=answer, got {pair!r}"
            )
        mapping[role.strip()] = column.strip()
    return mapping


def modules_arg(value: str) -> str | list[str]:
    """A preset (all-linear, attention, mlp) or module names separated by commas."""
    return value if value in TARGET_PRESETS else [m.strip() for m in value.split(",") if m.strip()]


def pattern_arg(value: str) -> dict[str, int]:
    """`down_proj=8,layers\\.0\\.=4` -> {"down_proj": 8, "layers\\.0\\.": 4} (module-name regex = integer)."""
    pattern = {}
    for pair in value.split(","):
        key, sep, number = pair.rpartition("=")
        if not sep or not key.strip() or not number.strip().isdigit():
            raise argparse.ArgumentTypeError(f"want NAME_REGEX=INTEGER pairs like down_proj=8, got {pair!r}")
        pattern[key.strip()] = int(number)
    return pattern


PEFT_FLAGS = (
    "peft_method", "lora_method", "rslora", "lora_plus_ratio", "init_lora_weights", "loftq_iter", "rank_pattern",
    "alpha_pattern", "num_virtual_tokens",
)  # fmt: skip


def add_peft_flags(parser: argparse.ArgumentParser) -> None:
    """The PEFT method and its options (docs/peft_methods.md compares them); unset: plain LoRA."""
    group = parser.add_argument_group("PEFT method (unset: LoRA)")
    group.add_argument("--peft-method", choices=list(METHODS), help="default lora")
    group.add_argument("--lora-method", choices=list(LORA_METHODS), help="dora: weight-decomposed LoRA")
    group.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    group.add_argument("--lora-plus-ratio", type=float, metavar="R", help="LoRA+: B learns at R x the LR")
    group.add_argument("--init-lora-weights", choices=list(INITS), help="default: A random, B zero")
    group.add_argument("--loftq-iter", type=int, help="LoftQ alternations (default 1)")
    group.add_argument("--rank-pattern", type=pattern_arg, metavar="REGEX=R,...", help="per-layer ranks")
    group.add_argument("--alpha-pattern", type=pattern_arg, metavar="REGEX=A,...", help="per-layer alphas")
    group.add_argument("--num-virtual-tokens", type=int, help="prompt/prefix tuning (default 20)")


def peft_from_args(args: argparse.Namespace) -> PeftSettings:
    """The PeftSettings the flags give (for `plan`, which has no TrainConfig)."""
    names = {"peft_method": "method", "init_lora_weights": "init"}
    given = {names.get(n, n): getattr(args, n) for n in PEFT_FLAGS if getattr(args, n, None) is not None}
    return PeftSettings(**given)


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """The planner's knobs, named as in `qlora-lite plan`; unset means the planner chooses."""
    knobs = parser.add_argument_group("planner knobs (unset: the planner chooses and explains)")
    knobs.add_argument("--quantization", choices=["nf4", "int8", "none"])
    knobs.add_argument("--double-quant", type=on_off, metavar="on|off")
    knobs.add_argument("--compute-dtype", choices=["bf16", "fp16", "fp32"])
    knobs.add_argument("--micro-batch-size", type=int)
    knobs.add_argument("--gradient-accumulation-steps", type=int)
    knobs.add_argument("--effective-batch-size", type=int)
    knobs.add_argument("--max-seq-length", type=int)
    knobs.add_argument("--gradient-checkpointing", type=on_off, metavar="on|off")
    knobs.add_argument(
        "--optimizer", choices=["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
    )
    knobs.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"])
    knobs.add_argument("--lora-r", type=int)
    knobs.add_argument(
        "--lora-target-modules", "--target-modules", dest="lora_target_modules", type=modules_arg,
        metavar="all-linear|attention|mlp|a,b,...",
    )  # fmt: skip
    knobs.add_argument(
        "--max-memory", metavar="SIZE", help="memory budget, e.g. 14GiB (default: what the device has)"
    )


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (never lose work)")
    group.add_argument(
        "--checkpoint-dir", help="durable place for checkpoints (default: Google Drive when mounted)"
    )
    group.add_argument("--save-every-minutes", type=float, help="default: the plan's interval, at most 10")
    group.add_argument("--save-every-steps", type=int)
    group.add_argument(
        "--resume",
        choices=["auto", "never", "force", "local"],
        help="default auto: continue the same run; never: start afresh (older checkpoints kept aside); local: "
        "continue from this machine's checkpoints when the durable place cannot be listed",
    )
    group.add_argument(
        "--public-checkpoints",
        action="store_true",
        default=None,
        help="allow checkpoints in a public Hub repo (refused otherwise)",
    )


def add_hub_source_flags(parser: argparse.ArgumentParser) -> None:
    """Which revision of a Hub model, which config/split of a Hub data set (--model/--data org/name)."""
    parser.add_argument(
        "--model-revision", help="branch, tag or commit of a Hub model (or --model org/name@REV)"
    )
    parser.add_argument("--data-config", help="config (subset) of a Hub data set given as --data org/name")
    parser.add_argument("--data-split", help="split of a Hub data set (default: train)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The schedule, LoRA, checkpoint and planner flags every training command shares."""
    parser.add_argument("--columns", type=columns_arg, metavar="ROLE=COL,...")
    add_hub_source_flags(parser)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora-alpha", type=int)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    parser.add_argument("--no-progress", action="store_true")
    add_checkpoint_flags(parser)
    add_knob_flags(parser)
    add_peft_flags(parser)


TRAIN_FLAGS = (
    "format", "columns", "data_config", "data_split", "chat_template", "model_revision", "max_steps", "epochs", "learning_rate", "seed", "lora_alpha", "lora_dropout",
    "eval_fraction", "eval_every", "eval_generations", "sample_generations", "train_on", "overwrite", "quantization", "double_quant", "compute_dtype",
    "micro_batch_size", "gradient_accumulation_steps", "effective_batch_size", "max_seq_length",
    "gradient_checkpointing", "optimizer", "attn_implementation", "lora_r", "lora_target_modules", "max_memory",
    "checkpoint_dir", "save_every_minutes", "save_every_steps", "resume", "public_checkpoints", "push_to_hub", "hub_private", *PEFT_FLAGS,
)  # fmt: skip


def print_result(result) -> None:
    """A finished (or resumed) run's folder and metrics as one JSON object on stdout."""
    summary = {"output_dir": str(result.output_dir), "resumed_from_step": result.resumed_from_step}
    print(json.dumps({**summary, **result.metrics}, indent=2))
