"""One typed config for a training run. Every field is a keyword of `train()` and a `qlora-lite train` flag.

Planner knobs default to None, meaning "let the planner choose"; a value the user sets stays fixed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings

PLANNER_KNOBS = (
    "quantization",
    "double_quant",
    "compute_dtype",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "max_seq_length",
    "gradient_checkpointing",
    "optimizer",
    "attn_implementation",
    "lora_r",
    "lora_target_modules",
)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
RESUME_MODES = ("auto", "never", "force", "local")
# Fields that are not settings: where things are, and live objects.
_NOT_SETTINGS = ("model", "data", "output_dir", "callbacks", "hardware", "progress")


@dataclass
class TrainConfig:
    model: str
    data: Any
    output_dir: str
    # data
    data_config: str | None = None  # a Hub data set's config (subset)
    data_split: str | None = None  # a Hub data set's split (None: train)
    chat_template: str | None = (
        None  # None: the tokenizer's own (ChatML if none); chatml/llama3/gemma; a file
    )
    model_revision: str | None = None  # a Hub model's branch/tag/commit (also `org/name@revision`)
    format: str | None = None
    columns: dict[str, str] | None = None
    eval_fraction: float = 0.1
    train_on: str = "assistant"  # "assistant": loss on responses only; "all": every token
    # schedule
    max_steps: int | None = None
    epochs: float = 1.0
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_every: int | None = None  # optimizer steps; None: about 5 evaluations per run
    eval_generations: int = 0  # held-out prompts answered before/after for exact/contains match (0: off)
    sample_generations: int = 3  # held-out answers shown side by side, before and after
    # LoRA (rank and targets are planner knobs too: they change memory)
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] | None = None  # all-linear | attention | mlp | [names]
    # PEFT method (model/peft_methods.py: what each costs; the planner accounts for it)
    peft_method: str = "lora"  # lora | ia3 | prompt_tuning | prefix_tuning
    lora_method: str = "lora"  # lora | dora
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    lora_plus_ratio: float | None = None  # LoRA+: B matrices learn at ratio x the learning rate
    init_lora_weights: str = "default"  # default | gaussian | pissa | olora | loftq
    loftq_iter: int = 1
    rank_pattern: dict[str, int] | None = None  # {"regex of module names": rank}
    alpha_pattern: dict[str, int] | None = None
    num_virtual_tokens: int = 20  # prompt / prefix tuning
    # planner knobs
    quantization: str | None = None
    double_quant: bool | None = None
    compute_dtype: str | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    effective_batch_size: int | None = None
    max_seq_length: int | None = None
    gradient_checkpointing: bool | None = None
    optimizer: str | None = None
    attn_implementation: str | None = None
    # never lose work
    checkpoint_dir: str | None = None  # the durable place; None: Google Drive when mounted, else local only
    save_every_minutes: float | None = None  # None: the plan's interval (at most 10 minutes)
    save_every_steps: int | None = None
    keep_checkpoints: int = 2
    # "auto": continue the same run if found; "never": start afresh (older checkpoints moved aside, kept);
    # "force": even if settings differ; "local": from this machine's checkpoints, without listing the durable place
    resume: str = "auto"
    public_checkpoints: bool = False  # checkpoints may go to a public Hub repo (refused unless set)
    # ship (the token comes from HF_TOKEN / `hf auth login` / the Colab secret, never from a setting)
    push_to_hub: str | None = None  # a repo id: push the adapter with a model card when training ends
    hub_private: bool = True
    # machine and behaviour
    hardware: Any = None  # None: detect; a profile name ("t4") or a HardwareProfile to plan for
    max_memory: str | int | None = None
    overwrite: bool = False
    progress: bool = True
    callbacks: list[Any] = field(default_factory=list)

    def peft_settings(self) -> PeftSettings:
        """The PEFT method options (rank and targets are filled from the plan before attaching)."""
        return PeftSettings(
            method=self.peft_method, alpha=self.lora_alpha, dropout=self.lora_dropout,
            lora_method=self.lora_method, rslora=self.rslora, init=self.init_lora_weights,
            loftq_iter=self.loftq_iter, rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern,
            lora_plus_ratio=self.lora_plus_ratio, num_virtual_tokens=self.num_virtual_tokens,
        )  # fmt: skip

    def fixed_knobs(self) -> dict[str, Any]:
        """The planner knobs the user set (everything else the planner fills in), and the PEFT method."""
        knobs = {name: getattr(self, name) for name in PLANNER_KNOBS if getattr(self, name) is not None}
        knobs["peft"] = self.peft_settings()
        if self.max_memory is not None:
            knobs["max_memory"] = self.max_memory
        return knobs

    def to_record(self) -> dict[str, Any]:
        """JSON-able: the inputs and every setting, as `qlora-lite resume` needs them."""
        settings = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_SETTINGS
        }
        data = self.data if isinstance(self.data, str) else None
        hardware = self.hardware if isinstance(self.hardware, str) else None
        return {
            "model": self.model,
            "data": data,
            "output_dir": self.output_dir,
            "hardware": hardware,
            "settings": settings,
        }

    def validate(self) -> None:
        """Collect every problem, then raise once."""
        problems = []
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 (got {self.max_steps})")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0 (got {self.epochs})")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate must be in (0, 1) (got {self.learning_rate})")
        if not 0 <= self.eval_fraction < 0.5:
            problems.append(f"eval_fraction must be in [0, 0.5) (got {self.eval_fraction})")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(
                f"lr_scheduler must be one of {', '.join(SCHEDULERS)} (got {self.lr_scheduler!r})"
            )
        if self.train_on not in ("assistant", "all"):
            problems.append(f"train_on must be 'assistant' or 'all' (got {self.train_on!r})")
        for name in (
            "micro_batch_size",
            "gradient_accumulation_steps",
            "effective_batch_size",
            "max_seq_length",
            "lora_r",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if self.resume not in RESUME_MODES:
            problems.append(f"resume must be one of {', '.join(RESUME_MODES)} (got {self.resume!r})")
        if self.save_every_minutes is not None and self.save_every_minutes <= 0:
            problems.append(f"save_every_minutes must be > 0 (got {self.save_every_minutes})")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            problems.append(f"save_every_steps must be >= 1 (got {self.save_every_steps})")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1 (got {self.keep_checkpoints})")
        if self.eval_generations < 0 or self.sample_generations < 0:
            problems.append("eval_generations and sample_generations must be >= 0")
        if self.eval_every is not None and self.eval_every < 1:
            problems.append(f"eval_every must be >= 1 (got {self.eval_every})")
        problems += self.peft_settings().problems()
        if self.checkpoint_dir and not str(self.checkpoint_dir).startswith("hf://"):
            from qlora_lite.checkpoint.durable import check_drive_path

            try:
                check_drive_path(self.checkpoint_dir)  # before anything is loaded or written
            except UserError as exc:
                problems.append(str(exc))
        if problems:
            raise UserError("invalid training settings: " + "; ".join(problems))


def make_config(model: str, data: Any, output_dir: str, **overrides: Any) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(
            f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names - {'model', 'data', 'output_dir'}))}"
        )
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    config = TrainConfig(model=str(model), data=data, output_dir=str(output_dir), **overrides)
    config.validate()
    return config
