"""The causal-LM task: conversations -> next-token loss on the supervised (assistant) tokens.

Its objective divides each micro-batch's summed token loss by the supervised tokens of the whole optimizer
step; periodic evaluation is the held-out token loss; at the end it can answer held-out prompts before/after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from qlora_lite.data import encoding as encode_mod
from qlora_lite.data import formats as data_mod
from qlora_lite.data.encoding import IGNORE_INDEX, Example
from qlora_lite.data.hub_dataset import HubDataset, pin_data_source
from qlora_lite.data.templates import apply_chat_template_choice, end_of_turn, generation_config_for
from qlora_lite.model.loading import load_base_model
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.training.batching import MicroBatch, collate_rows, row_groups
from qlora_lite.training.fastpath import FastPaths, choose_fast_paths
from qlora_lite.training.loop import (
    LoopState,
    StepRunner,
    autocast,
    eval_halving_batch_on_oom,
    split_micro_batches,
)
from qlora_lite.training.tasks import Finished, PreparedData, TaskData, TrainResult


def collate(
    batch: Sequence[Example], pad_token_id: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the micro-batch."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }


def supervised_tokens(example: Example) -> int:
    """Tokens that carry loss after the causal shift (the first position never has a target)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


class CausalLMObjective:
    """Sum of token losses / supervised tokens of the whole step (transformers' `num_items_in_batch`).

    With `fast` (training/fastpath.py, checked on the loaded model): a micro-batch is `micro_batch_size` rows,
    each packing several of the step's examples (no attention across them), and/or the loss runs in chunks
    on supervised positions. Without it: one right-padded example per row and the model's own loss.
    """

    collate = staticmethod(collate)

    def __init__(self, fast: FastPaths | None = None) -> None:
        self.fast = fast

    @property
    def pack_capacity(self) -> int | None:
        return self.fast.pack_capacity if self.fast else None

    def denominator(self, batch: Sequence[Example]) -> int:
        return max(1, sum(supervised_tokens(e) for e in batch))

    def micro_batches(self, indices, examples, micro_batch_size: int, pad_token_id: int, device) -> Iterator:  # noqa: ANN001
        """The loop's row-grouping hook: rows fixed by the step's examples alone, `micro_batch_size` per batch."""
        if self.fast is None:
            for micro in split_micro_batches(indices, examples, micro_batch_size):
                yield collate([examples[i] for i in micro], pad_token_id, device)
            return
        for group in row_groups(indices, examples, micro_batch_size, self.fast.pack_capacity):
            rows = [[examples[i] for i in row] for row in group]
            yield collate_rows(rows, pad_token_id, device, packed=self.fast.packing)

    def loss(self, model: torch.nn.Module, batch: dict | MicroBatch, denominator: float) -> torch.Tensor:
        if isinstance(batch, MicroBatch):
            return self.fast.loss(model, batch, denominator)
        num_items = torch.tensor(denominator, device=batch["input_ids"].device)
        return model(**batch, num_items_in_batch=num_items).loss


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    device: torch.device | str,
    micro_batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> float | None:
    """Mean token loss on held-out examples (token-weighted, like training); halves its batch on OOM."""
    if not examples:
        return None
    return eval_halving_batch_on_oom(
        model,
        micro_batch_size,
        lambda size: _eval_pass(model, examples, pad_token_id, device, size, autocast_dtype),
        "evaluation",
    )


def _eval_pass(model, examples, pad_token_id, device, micro_batch_size, autocast_dtype) -> float | None:
    total, count = 0.0, 0
    for micro in split_micro_batches(range(len(examples)), examples, micro_batch_size):
        batch = collate([examples[i] for i in micro], pad_token_id, device)
        n = sum(supervised_tokens(examples[i]) for i in micro)
        if n == 0:
            continue
        with autocast(device, autocast_dtype):
            loss = model(**batch, num_items_in_batch=torch.tensor(n, device=device)).loss
        total += float(loss) * n
        count += n
    return total / count if count else None


class CausalLM:
    """Chat, instruction, prompt/completion and plain-text data: loss on the tokens the model should write."""

    name = "causal_lm"
    title = "LoRA"
    files: tuple[str, ...] = ()
    result_type = TrainResult
    distributed = True

    def __init__(self, records: list[dict] | None = None, spec: Any = None, source: Any = None) -> None:
        # Already read when given (train() reads the data once to pick the task); `source` is the pinned
        # data source (a Hub data set at its commit, or what the user gave).
        self.records, self.spec, self.source = records, spec, source
        self.config = None
        self.eval_records: list[dict] | None = None
        self.template: str | None = None  # the chat template applied to the tokenizer

    def read(self, config) -> TaskData:
        self.config = config
        if self.records is None:
            self.source = pin_data_source(config.data, config.data_config, config.data_split)
            self.records, self.spec = data_mod.load_dataset_for_training(
                self.source, format=config.format, columns=config.columns
            )
        self.eval_records = None
        identity = {}
        if config.eval_data is not None:  # a separate held-out set, in the same format, replaces the split
            self.eval_records = data_mod.load_records(config.eval_data)
            data_mod.to_conversations(self.eval_records, self.spec)  # its problems are reported now
            identity = {"eval_data_fingerprint": data_mod.fingerprint(self.eval_records, self.spec)}
        described = self.source.describe() if isinstance(self.source, HubDataset) else {}
        fingerprint = data_mod.fingerprint(self.records, self.spec)
        return TaskData(self.spec, fingerprint, len(self.records), identity=identity, record=described)

    def check_checkpoint(self, latest) -> None:
        return None

    def prepare(self, tokenizer, max_seq_length: int | None) -> PreparedData:
        config = self.config
        if self.template is None:
            self.template = apply_chat_template_choice(tokenizer, config.chat_template)
        conversations = data_mod.to_conversations(self.records, self.spec)
        if self.eval_records is not None:
            train_items, eval_items = conversations, data_mod.to_conversations(self.eval_records, self.spec)
        else:
            train_items, eval_items = data_mod.split_train_eval(
                conversations, config.eval_fraction, seed=config.seed
            )
        train, stats = encode_mod.encode_dataset(
            train_items, tokenizer, max_seq_length, train_on=config.train_on
        )
        held, _ = encode_mod.encode_dataset(eval_items, tokenizer, max_seq_length, train_on=config.train_on)
        fingerprint = data_mod.fingerprint(self.records, self.spec)
        sample = data_mod.prompt_sample(train_items)
        return PreparedData(
            self.spec, fingerprint, train, held, stats, len(self.records), eval_items, sample, stats.lengths
        )

    def plan_knobs(self) -> dict[str, Any]:
        return {}

    def load_model(self, source, plan, accelerator: str, tokenizer) -> tuple[Any, dict]:
        base = load_base_model(
            source.name,
            revision=source.revision,  # the commit the plan and the run identity name
            quantization=plan.quantization,
            double_quant=plan.double_quant,
            compute_dtype=plan.compute_dtype,
            accelerator=accelerator,
            attn_implementation=plan.attn_implementation,
        )
        return base, {}

    def objective(self, device, model, plan, examples, pad_token_id, autocast_dtype) -> CausalLMObjective:  # noqa: ANN001
        """Packing and the chunked loss as planned, where a check on the loaded model confirms they apply."""
        lora = PeftSettings.from_record(plan.peft).entry.peft_type == "LORA"  # prompt methods prepend tokens
        if not lora or not (getattr(plan, "packing", False) or getattr(plan, "chunked_loss", False)):
            return CausalLMObjective()
        fast = choose_fast_paths(
            model, examples, pad_token_id, device, autocast_dtype,
            packing=plan.packing, chunked_loss=plan.chunked_loss, capacity=plan.max_seq_length,
        )  # fmt: skip
        return CausalLMObjective(fast)

    def evaluate(self, runner: StepRunner, prepared: PreparedData, state: LoopState) -> dict | None:
        eval_loss = evaluate_loss(
            runner.model, prepared.eval, runner.pad_token_id, runner.device, state.micro_batch_size,
            runner.autocast_dtype,
        )  # fmt: skip
        return None if eval_loss is None else {"step": state.step, "eval_loss": round(eval_loss, 6)}

    def finish(self, model, tokenizer, prepared: PreparedData, runner, state, out: Path) -> Finished:
        config = self.config
        generation_config_for(model, tokenizer).save_pretrained(out)  # stop at the learned end-of-turn too
        fast = getattr(runner.objective, "fast", None)
        record: dict[str, Any] = {
            "generation_eval": None,
            "chat_template": {"template": self.template, "end_of_turn": end_of_turn(tokenizer)},
            # What the step really used: the plan asks, the check on the loaded model may have said no.
            "fast_paths": {
                "packing": bool(fast and fast.packing),
                "chunked_loss": bool(fast and fast.loss.chunked),
                "notes": list(fast.notes) if fast else [],
            },
        }
        if not (config.eval_generations or config.sample_generations):
            return Finished(record=record)
        from qlora_lite.training.generation_eval import before_after

        generations = record["generation_eval"] = before_after(
            model, tokenizer, prepared.eval_conversations, config.eval_generations, config.sample_generations
        )
        metrics = {}
        if generations and "after" in generations:
            metrics = {
                "exact_match": generations["after"]["exact_match"],
                "contains_match": generations["after"]["contains_match"],
            }
        return Finished(metrics=metrics, record=record)

    def result_fields(self, out: Path, record: dict) -> dict[str, Any]:
        return {}
