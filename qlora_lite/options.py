"""Every training option, declared once: type, default, help, checks, choices, and where it is used.

Derived from `OPTIONS` (nothing else lists options by hand):
- `TrainConfig`'s fields and `TrainConfig.validate` (qlora_lite.config),
- the flags of `qlora-lite train`, `plan` and `train-classifier` (qlora_lite.cli.flags),
- the knobs `plan()` accepts and `plan --json` reports (`planner=True`; qlora_lite.planner.planning),
- what a resumed run must match (`resume="match"`, the run identity) or keeps from its checkpoint's plan
  (`resume="kept"`) (qlora_lite.checkpoint.resume, qlora_lite.training.run),
- the settings rows of a pushed adapter's model card (`card=`; qlora_lite.hub.card),
- the PEFT method settings (`peft=`: the `PeftSettings` field it sets; qlora_lite.model.peft_methods).

A new LoRA option is three edits: one `Option(..., peft="field")` below, the field on `PeftSettings`, and
its use in the method's `peft_config` (qlora_lite/model/peft_methods.py). See docs/architecture.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qlora_lite.model.peft_methods import INITS, LORA_METHODS, METHODS, TARGET_PRESETS
from qlora_lite.planner.memory import (
    ATTENTION,
    COMPUTE_DTYPES,
    OPTIMIZER_STATE_BYTES,
    PRECISIONS,
    QUANTIZATIONS,
)

TRAIN, PLAN, CLASSIFY = "train", "plan", "train-classifier"
TRAINING = frozenset({TRAIN, CLASSIFY})
EVERYWHERE = frozenset({TRAIN, PLAN, CLASSIFY})
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
RESUME_MODES = ("auto", "never", "force", "local")


# ----------------------------------------------------------------------------- value parsers (CLI strings)


def on_off(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def modules_arg(value: str) -> str | list[str]:
    """`q_proj,v_proj` -> ["q_proj", "v_proj"]; a preset (all-linear, attention, mlp) stays a string."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give module names separated by commas, or all-linear")
    return names[0] if len(names) == 1 and names[0] in TARGET_PRESETS else names


def pattern_arg(value: str) -> dict[str, int]:
    """`down_proj=8,layers\\.0\\.=4` -> {"down_proj": 8, "layers\\.0\\.": 4} (module-name regex = integer)."""
    pattern = {}
    for pair in value.split(","):
        key, sep, number = pair.rpartition("=")
        if not sep or not key.strip() or not number.strip().isdigit():
            raise argparse.ArgumentTypeError(f"want NAME_REGEX=INTEGER pairs like down_proj=8, got {pair!r}")
        pattern[key.strip()] = int(number)
    return pattern


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


# ------------------------------------------------------------------------------------------ checks

Check = tuple[Callable[[Any], bool], str]  # (is the value fine?, what it must be)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


POSITIVE_INT: Check = (
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "must be a positive integer",
)


BOOL: Check = (lambda v: isinstance(v, bool), "must be True or False (on/off)")


def at_least(low: float) -> Check:
    return (lambda v: _number(v) and v >= low, f"must be >= {low:g}")


def above(low: float) -> Check:
    return (lambda v: _number(v) and v > low, f"must be > {low:g}")


def between(low: float, high: float, text: str) -> Check:
    return (lambda v: _number(v) and low <= v < high and (text[0] == "[" or v > low), f"must be in {text}")


# ---------------------------------------------------------------------------------------- the option


@dataclass(frozen=True)
class Option:
    """One setting of a training run. `None` as a planner knob's value means "the planner chooses"."""

    name: str
    parse: Callable[[str], Any]  # CLI string -> value (int, float, str, on_off, ...)
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    check: Check | None = None
    planner: bool = False  # plan() takes it as a fixed knob; unset, the planner chooses (and explains)
    # "match": part of the run's identity; "match_if_set": part of it when not at its default (checkpoints made
    # before the option existed stay valid); "kept": restored from the checkpoint's plan; "free": may change.
    resume: str = "free"
    commands: frozenset = TRAINING  # the CLI commands that have its flag
    flag: str | None = None  # default: --name-with-dashes
    aliases: tuple[str, ...] = ()  # further flag names
    action: str | None = None  # argparse action for flags without a value (store_true / store_false)
    metavar: str | None = None
    card: str | None = None  # the model card row that shows it
    peft: str | None = None  # the PeftSettings field it sets (qlora_lite.model.peft_methods)
    recipe_names: tuple[str, ...] = ()  # other names a YAML recipe may use (Hugging Face / TRL / Axolotl)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def problem(self, value: Any, label: str | None = None) -> str | None:
        """None when `value` is acceptable; else one sentence naming `label` (the field or the CLI flag)."""
        label = label or self.name
        if value is None and (self.default is None or self.planner):
            return None
        if self.choices is not None and value not in self.choices:
            return f"{label} must be one of {', '.join(map(str, self.choices))} (got {value!r})"
        if self.check is not None:
            ok, text = self.check
            if not ok(value):
                return f"{label} {text} (got {value!r})"
        return None


def _knob(name: str, parse: Callable, help: str, **kw: Any) -> Option:
    return Option(name, parse, None, help, planner=True, commands=EVERYWHERE, **kw)


OPTIONS: tuple[Option, ...] = (
    # where the model and data come from (a Hub model's revision; a Hub data set's config and split)
    Option("model_revision", str, None, "branch, tag or commit of a Hub model (or --model org/name@REV)", commands=EVERYWHERE),
    Option("data_config", str, None, "config (subset) of a Hub data set given as --data org/name", commands=EVERYWHERE, resume="match"),
    Option("data_split", str, None, "split of a Hub data set (default: train)", commands=EVERYWHERE, resume="match"),
    Option("chat_template", str, None, "the tokenizer's own (default; ChatML if it has none), chatml, llama3, gemma, or a Jinja file", commands=frozenset({TRAIN}), resume="match"),
    # data
    Option("format", str, None, "data format (default: detected)", commands=frozenset({TRAIN}), resume="match"),
    Option("columns", columns_arg, None, "which column holds which role, e.g. output=answer", metavar="ROLE=COL,..."),
    Option("eval_fraction", float, 0.1, "share of the data held out for evaluation", check=between(0, 0.5, "[0, 0.5)"), resume="match"),
    Option("train_on", str, "assistant", "assistant: loss on responses only; all: on every token", choices=("assistant", "all"), commands=frozenset({TRAIN}), resume="match"),
    # schedule
    Option("max_steps", int, None, "optimizer steps (default: --epochs over the data)", check=at_least(1), resume="match", card="steps planned"),
    Option("epochs", float, 1.0, "passes over the data when --max-steps is not set", check=above(0), resume="match", recipe_names=("num_train_epochs",)),
    Option("learning_rate", float, 2e-4, "peak learning rate", check=between(0, 1, "(0, 1)"), resume="match", card="learning rate"),
    Option("lr_scheduler", str, "cosine", "learning-rate schedule", choices=SCHEDULERS, resume="match", card="learning-rate schedule", recipe_names=("lr_scheduler_type",)),
    Option("warmup_ratio", float, 0.03, "share of the steps spent warming up", check=at_least(0), resume="match"),
    Option("warmup_steps", int, None, "warm-up steps (overrides --warmup-ratio)", check=at_least(0), resume="match"),
    Option("weight_decay", float, 0.0, "AdamW weight decay", check=at_least(0), resume="match"),
    Option("max_grad_norm", float, 1.0, "gradient clipping norm (0: off)", check=at_least(0), resume="match"),
    Option("seed", int, 42, "seed of the data order, the split and the LoRA init", resume="match"),
    Option("eval_data", str, None, "a held-out data file (or Hub data set) instead of the --eval-fraction split", commands=frozenset({TRAIN}), resume="match", metavar="FILE"),
    Option("early_stopping_patience", int, None, "stop after this many evaluations without a lower eval loss", check=at_least(1), resume="match", metavar="N"),
    Option("keep_best", bool, False, "keep the best-eval adapter as the run's adapter (the last one stays in the newest checkpoint)", action="store_true", check=BOOL, resume="match"),
    Option("report_to", str, None, "experiment tracking: none, tensorboard, wandb, trackio (several joined by commas)", metavar="NAME[,NAME]"),
    Option("eval_every", int, None, "optimizer steps between evaluations (default: about 5 per run)", check=at_least(1), recipe_names=("eval_steps",)),
    Option("eval_generations", int, 0, "held-out prompts scored by exact/contains match before/after", check=at_least(0), commands=frozenset({TRAIN})),
    Option("sample_generations", int, 3, "held-out answers shown side by side before/after", check=at_least(0), commands=frozenset({TRAIN})),
    # LoRA (rank and targets are planner knobs too: they change memory)
    _knob("lora_r", int, "LoRA rank", check=POSITIVE_INT, resume="kept", card="LoRA rank", recipe_names=("r",)),
    Option("lora_alpha", int, None, "LoRA alpha (default: 2 x rank)", resume="match", card="LoRA alpha", peft="alpha"),
    Option("lora_dropout", float, 0.05, "dropout on the LoRA input", check=between(0, 1, "[0, 1)"), resume="match", card="LoRA dropout", peft="dropout"),
    _knob("lora_target_modules", modules_arg, "modules that get LoRA: a preset or names", metavar="all-linear|attention|mlp|a,b,...", aliases=("--target-modules",), resume="kept", card="LoRA targets", recipe_names=("target_modules",)),
    # PEFT method (model/peft_methods.py says what each costs; the planner accounts for it). Unset: plain LoRA.
    Option("peft_method", str, "lora", "the PEFT method", choices=tuple(METHODS), commands=EVERYWHERE, resume="match_if_set", peft="method"),
    Option("lora_method", str, "lora", "dora: weight-decomposed LoRA", choices=LORA_METHODS, commands=EVERYWHERE, resume="match_if_set", peft="lora_method"),
    Option("rslora", bool, False, "scale by alpha/sqrt(r) instead of alpha/r", action="store_true", commands=EVERYWHERE, resume="match_if_set", peft="rslora", recipe_names=("use_rslora", "peft_use_rslora")),
    Option("lora_plus_ratio", float, None, "LoRA+: B matrices learn at R x the learning rate", metavar="R", check=above(0), commands=EVERYWHERE, resume="match_if_set", peft="lora_plus_ratio", recipe_names=("loraplus_lr_ratio",)),
    Option("init_lora_weights", str, "default", "LoRA init (default: A random, B zero)", choices=tuple(INITS), commands=EVERYWHERE, resume="match_if_set", peft="init"),
    Option("loftq_iter", int, 1, "LoftQ alternations (more than 1 rewrites the 4-bit base: saved in loftq_base/ and shipped with the adapter)", check=at_least(1), commands=EVERYWHERE, resume="match_if_set", peft="loftq_iter"),
    Option("rank_pattern", pattern_arg, None, "per-layer ranks", metavar="REGEX=R,...", commands=EVERYWHERE, resume="match_if_set", peft="rank_pattern"),
    Option("alpha_pattern", pattern_arg, None, "per-layer alphas", metavar="REGEX=A,...", commands=EVERYWHERE, resume="match_if_set", peft="alpha_pattern"),
    Option("num_virtual_tokens", int, 20, "virtual tokens of prompt/prefix tuning", check=at_least(1), commands=EVERYWHERE, resume="match_if_set", peft="num_virtual_tokens"),
    # planner knobs
    _knob("quantization", str, "base weights: 4-bit NF4, 8-bit or none", choices=QUANTIZATIONS, resume="kept", card="quantization"),
    _knob("double_quant", on_off, "quantize the 4-bit scales too", metavar="on|off", check=BOOL, resume="kept", card="double quantization", recipe_names=("bnb_4bit_use_double_quant",)),
    _knob("compute_dtype", str, "dtype of the matmuls", choices=tuple(COMPUTE_DTYPES), resume="kept", card="compute dtype"),
    _knob("micro_batch_size", int, "examples per forward/backward", check=POSITIVE_INT, recipe_names=("per_device_train_batch_size",)),
    _knob("gradient_accumulation_steps", int, "micro-batches per optimizer step", check=POSITIVE_INT),
    _knob("effective_batch_size", int, "examples per optimizer step", check=POSITIVE_INT, resume="kept"),
    _knob("max_seq_length", int, "tokens per example (longer ones are truncated)", check=POSITIVE_INT, resume="kept", card="max sequence length", recipe_names=("max_length", "sequence_len")),
    _knob("gradient_checkpointing", on_off, "recompute activations in backward", metavar="on|off", check=BOOL, resume="kept", card="gradient checkpointing"),
    _knob("optimizer", str, "optimizer", choices=tuple(OPTIMIZER_STATE_BYTES), resume="kept", card="optimizer"),
    _knob("attn_implementation", str, "attention kernel", choices=ATTENTION, resume="kept", card="attention"),
    _knob("packing", on_off, "pack several examples per row, without attention across them (causal LM)", metavar="on|off", check=BOOL, resume="kept", card="packing"),
    _knob("precision", str, "4-bit/8-bit with 16-bit compute: upcast (peft's fp32 embeddings, LM head, norms) or lean (they stay 16-bit, LoRA fp32)", choices=PRECISIONS, resume="kept", card="precision"),
    _knob("chunked_loss", on_off, "loss on supervised positions in chunks: no full fp32 logits (causal LM)", metavar="on|off", check=BOOL, resume="kept", card="chunked loss"),
    _knob("max_memory", str, "memory budget, e.g. 14GiB (default: what the device has)", metavar="SIZE"),
    # never lose work
    Option("checkpoint_dir", str, None, "durable place for checkpoints: a folder or hf://user/repo (default: Google Drive when mounted)"),
    Option("save_every_minutes", float, None, "minutes between checkpoints (default: the plan's interval, at most 10)", check=above(0)),
    Option("save_every_steps", int, None, "optimizer steps between checkpoints", check=at_least(1), recipe_names=("save_steps",)),
    Option("keep_checkpoints", int, 2, "verified checkpoints kept", check=at_least(1), recipe_names=("save_total_limit",)),
    Option("resume", str, "auto", "auto: continue the same run if found; never: start afresh (older checkpoints moved aside, kept); force: even if settings differ; local: from this machine's checkpoints when the durable place cannot be listed", choices=RESUME_MODES),
    Option("public_checkpoints", bool, False, "allow checkpoints in a public Hub repo (refused otherwise)", action="store_true"),
    # ship (the token comes from HF_TOKEN / `hf auth login` / the Colab secret, never from a setting)
    Option("push_to_hub", str, None, "push the adapter and a model card to this repo when training ends", commands=frozenset({TRAIN}), metavar="REPO_ID"),
    Option("hub_private", bool, True, "make a new repo public", commands=frozenset({TRAIN}), flag="--hub-public", action="store_false"),
    Option("overwrite", bool, False, "replace a run already in --output", action="store_true"),
)  # fmt: skip

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
PLANNER_KNOBS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.planner)
IDENTITY_SETTINGS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.resume == "match")
IDENTITY_SETTINGS_IF_SET: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.resume == "match_if_set")
PEFT_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.peft)
KEPT_ON_RESUME: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.resume == "kept")


def for_command(command: str) -> tuple[Option, ...]:
    """The options whose flags the CLI command `command` has."""
    return tuple(o for o in OPTIONS if command in o.commands)


def planner_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The planner knobs among `settings` that are set (None means the planner chooses)."""
    return {k: v for k, v in settings.items() if k in BY_NAME and BY_NAME[k].planner and v is not None}


def problems(settings: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    """Every problem with `settings` (option name -> value), each naming the option as `labels` says."""
    found = []
    for name, value in settings.items():
        problem = BY_NAME[name].problem(value, (labels or {}).get(name))
        if problem:
            found.append(problem)
    return found


def peft_fields(settings: dict[str, Any]) -> dict[str, Any]:
    """`PeftSettings` keywords from option values (the options declared with `peft=`)."""
    return {o.peft: settings[o.name] for o in OPTIONS if o.peft and o.name in settings}


def names(options: Iterable[Option]) -> list[str]:
    return [o.name for o in options]
