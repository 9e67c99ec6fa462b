"""Text classification: labelled texts -> LoRA + a trained head -> labels with probabilities.

`train_classifier()` follows `train.run()` stage by stage (check the output, plan with a classification head
instead of vocabulary logits, load, resume or start, loop with checkpoints, evaluate, save) and reuses its
pieces. The head is saved with the adapter through PEFT's `modules_to_save`, so the folder loads with plain
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=N), run_dir)`.
The label mapping lives in `labels.json` (the config keywords for that call) and in `run_record.json`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from qlora_lite.checkpoint.resume import Checkpointer, run_identity
from qlora_lite.config import TrainConfig, make_config
from qlora_lite.data import labels as cdata
from qlora_lite.data.labels import ClassifierExample
from qlora_lite.errors import UserError
from qlora_lite.model.loading import (
    CLASSIFIER_HEADS,
    attach_lora,
    check_has_weights,
    load_base_model,
    load_tokenizer,
    torch_dtype,
)
from qlora_lite.model.peft_init import save_adapter
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.model.source import resolve_model_source
from qlora_lite.planner.hardware import HardwareProfile, detect
from qlora_lite.run_files import CONFUSION_PLOT, LABELS_FILE  # noqa: F401 (re-exported)
from qlora_lite.training.evaluation import (
    classification_metrics,
    format_classification_table,
    majority_baseline,
    plot_confusion_matrix,
)
from qlora_lite.training.loop import (
    StepRunner,
    autocast,
    eval_halving_batch_on_oom,
    split_micro_batches,
    step_examples,
    steps_per_epoch,
)
from qlora_lite.training.record import (
    LOSS_PLOT,
    RUN_CONFIG,
    RUN_RECORD,
    append_step_log,
    build_run_record,
    model_identity,
    plot_loss,
    write_json_atomic,
)
from qlora_lite.training.run import KEPT_ON_RESUME, PreparedData, TrainResult
from qlora_lite.training.setup import (
    RunFolder,
    checkpoint_metadata,
    finished_record,
    make_grad_scaler,
    probe_train_and_checkpoint,
    resume_point,
    run_metrics,
    seed_everything,
    start_or_restore,
)

log = logging.getLogger(__name__)

HEAD_NAMES = CLASSIFIER_HEADS

PERIODIC_EVAL_EXAMPLES = 256  # evaluations during training use at most this many held-out texts


@dataclass(frozen=True)
class ClassifierResult(TrainResult):
    labels: tuple = ()
    evaluation: dict[str, Any] | None = field(default=None, repr=False)
    confusion_matrix: Path | None = None


def collate(batch: list[ClassifierExample], pad_token_id: int, device: torch.device | str) -> dict:
    """Right-pad to the longest text; the models find the last real token from the attention mask/pad id."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    labels = torch.tensor([e.label for e in batch], dtype=torch.long)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


@dataclass
class ClassifierStepRunner(StepRunner):
    """`StepRunner` (fixed examples per step, OOM backoff, clipping) with a cross-entropy over the labels.

    Each micro-batch adds sum(weight[y] * CE) / sum of the weights of the whole step's examples, so the
    step's gradient does not depend on how it is split into micro-batches (without class weights every
    weight is 1 and the denominator is the number of examples in the step).
    """

    class_weights: torch.Tensor | None = None

    def _forward_backward(self, indices, micro_batch_size: int, denominator: int) -> float:
        if self.class_weights is not None:
            denominator = float(sum(self.class_weights[self.examples[i].label] for i in indices))
        total = 0.0
        for micro in split_micro_batches(indices, self.examples, micro_batch_size):
            batch = collate([self.examples[i] for i in micro], self.pad_token_id, self.device)
            labels = batch.pop("labels")
            with autocast(self.device, self.autocast_dtype):
                logits = self.model(**batch).logits
            loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="sum")
            loss = loss / denominator
            (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
            total += float(loss.detach())
        return total


@torch.no_grad()
def predict_logits(
    model, examples: list[ClassifierExample], pad_token_id: int, device, batch_size: int, autocast_dtype=None
) -> torch.Tensor:
    """Logits (float32, on CPU) for every example in order; halves the batch on out-of-memory."""

    def run_pass(size: int) -> torch.Tensor:
        out = torch.empty((len(examples), model.config.num_labels))
        for micro in split_micro_batches(range(len(examples)), examples, size):
            batch = collate([examples[i] for i in micro], pad_token_id, device)
            batch.pop("labels")
            with autocast(device, autocast_dtype):
                out[micro] = model(**batch).logits.float().cpu()
        return out

    return eval_halving_batch_on_oom(model, batch_size, run_pass, "prediction")


def evaluate_examples(
    model, examples, mapping: cdata.LabelMapping, pad_token_id, device, batch_size, dtype=None
):
    """(metrics dict, eval loss) on held-out examples: accuracy, macro-F1, per-class scores, confusion."""
    logits = predict_logits(model, examples, pad_token_id, device, batch_size, dtype)
    truth = torch.tensor([e.label for e in examples])
    loss = float(F.cross_entropy(logits, truth))
    metrics = classification_metrics(truth.tolist(), logits.argmax(-1).tolist(), mapping.names)
    return metrics, loss


def train_classifier(
    model: str,
    data: Any,
    output_dir: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: list | None = None,
    class_weights: str | dict | None = None,
    eval_data: Any = None,
    **overrides: Any,
) -> ClassifierResult:
    """Fine-tune `model` with LoRA and a classification head on labelled texts; save both in `output_dir`.

    `labels` fixes the label order (ids); default: sorted. `class_weights`: None, "balanced" or
    {label: weight}. `eval_data`: a separate held-out set (default: a stratified `eval_fraction` split).
    `overrides` are TrainConfig fields (max_steps, learning_rate, quantization, ...). Re-running the same
    call resumes an interrupted run.
    """
    columns = dict(overrides.pop("columns", None) or {})
    if text_column:
        columns["text"] = text_column
    if label_column:
        columns["label"] = label_column
    config = make_config(model, data, output_dir, columns=columns or None, **overrides)
    return run_classifier(config, labels=labels, class_weights=class_weights, eval_data=eval_data)


def load_classification_base(
    model_path: str,
    *,
    quantization: str,
    double_quant: bool,
    compute_dtype: str,
    accelerator: str,
    attn_implementation: str | None = "sdpa",
    revision: str | None = None,
    **config_kwargs: Any,
):
    """`model.load_base_model` for a classifier (the head stays out of 4/8-bit there)."""
    return load_base_model(
        model_path,
        revision=revision,
        quantization=quantization,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        accelerator=accelerator,
        attn_implementation=attn_implementation,
        task="classification",
        **config_kwargs,
    )


def _plan(
    model_path: Any, lengths: list[int], hardware, config: TrainConfig, saved: dict | None, num_labels: int
):
    from qlora_lite.planner.planning import plan as make_plan

    head = {"task": "classification", "num_labels": num_labels}
    fixed = {**config.fixed_knobs(), **head}
    if saved is not None:  # a resumed run keeps its plan; only the micro-batch split may change
        kept = {k: saved[k] for k in KEPT_ON_RESUME if k in saved}
        if isinstance(kept.get("lora_target_modules"), list):
            kept["lora_target_modules"] = tuple(kept["lora_target_modules"])
        fixed = {**{k: v for k, v in fixed.items() if k == "max_memory"}, **kept, **head}
        the_plan = make_plan(
            model_path, data=lengths, hardware=hardware, micro_batch_size=saved["micro_batch_size"], **fixed
        )
        if not the_plan.fits:
            the_plan = make_plan(model_path, data=lengths, hardware=hardware, **fixed)
    else:
        the_plan = make_plan(model_path, data=lengths, hardware=hardware, **fixed)
    log.info("plan:\n%s", the_plan.explain())
    if not the_plan.fits:
        nearest = f"; nearest plan that fits: {the_plan.nearest_fit}" if the_plan.nearest_fit else ""
        raise UserError(
            f"the run does not fit in {hardware.name} memory{nearest}. {the_plan.message}".strip()
        )
    return the_plan


def _hardware(config: TrainConfig, out: Path) -> HardwareProfile:
    if isinstance(config.hardware, HardwareProfile):
        return config.hardware
    from qlora_lite.planner.profiles import get_profile

    return get_profile(config.hardware) if config.hardware else detect(out)


def run_classifier(
    config: TrainConfig,
    *,
    labels: list | None = None,
    class_weights: str | dict | None = None,
    eval_data: Any = None,
) -> ClassifierResult:
    """`train_classifier` for a ready TrainConfig (what `train()` calls when the data is classification)."""
    started = time.time()
    data = cdata.load_labeled_data(config, labels=labels, eval_data=eval_data)  # validated before any write
    with RunFolder(config) as folder:  # locked for the whole run; its checkpoint store always closed
        return _run_classifier_in(config, folder, data, started, labels, class_weights, eval_data)


def _run_classifier_in(config, folder, data, started, labels, class_weights, eval_data) -> ClassifierResult:
    weights = cdata.resolve_class_weights(class_weights, data.mapping, data.train_ids)
    cdata.log_distribution(data, weights)
    source = resolve_model_source(config.model, config.model_revision)  # a Hub id: pinned to a commit
    model_path = source.name
    check_has_weights(model_path)
    tokenizer = load_tokenizer(source)
    identity = run_identity(config, model_identity(source), data.fingerprint)
    identity["classification"] = {"labels": list(data.mapping.names), "class_weights": weights}
    if not config.overwrite:
        cdata.check_saved_labels(Path(config.output_dir).expanduser() / RUN_RECORD, data.mapping)
    out = folder.path
    if config.overwrite:
        for name in (LABELS_FILE, CONFUSION_PLOT):
            (out / name).unlink(missing_ok=True)
    hardware = _hardware(config, out)
    finished = finished_record(out, identity)
    if finished is not None:
        log.info(
            "%s already holds this run, finished at step %d: nothing to do", out, finished["metrics"]["steps"]
        )
        plot = out / LOSS_PLOT
        matrix = out / CONFUSION_PLOT
        return ClassifierResult(
            out, out, out / RUN_RECORD, plot if plot.exists() else None, finished["metrics"], finished["plan"],
            labels=data.mapping.names, evaluation=finished.get("evaluation"),
            confusion_matrix=matrix if matrix.exists() else None,
        )  # fmt: skip

    store = folder.open_store()
    latest = resume_point(config, store, identity)
    if latest is not None:
        cdata.check_checkpoint_labels(latest, data.mapping)  # never forced: the head would mean other labels
    run_config = {**config.to_record(), "classifier": {"labels": labels, "class_weights": class_weights, "eval_data": eval_data if isinstance(eval_data, str) else None}}  # fmt: skip
    write_json_atomic(out / RUN_CONFIG, run_config)

    lengths = [len(ids) for ids in tokenizer([t for t, _ in data.train], truncation=False)["input_ids"]]
    the_plan = _plan(
        source,
        lengths,
        hardware,
        config,
        latest.metadata.get("plan") if latest else None,
        len(data.mapping),
    )
    train_examples, n_truncated = cdata.encode(data.train, data.mapping, tokenizer, the_plan.max_seq_length)
    eval_examples, _ = cdata.encode(data.eval, data.mapping, tokenizer, the_plan.max_seq_length)

    seed_everything(config.seed)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
    )
    base = load_classification_base(
        model_path, revision=source.revision, quantization=the_plan.quantization, double_quant=the_plan.double_quant,
        compute_dtype=the_plan.compute_dtype, accelerator=accelerator, attn_implementation=the_plan.attn_implementation,
        **data.mapping.config_kwargs(tokenizer.pad_token_id),
    )  # fmt: skip
    heads = [name for name in HEAD_NAMES if isinstance(getattr(base, name, None), torch.nn.Module)]
    if not heads:
        raise UserError(
            f"{model_path}: its sequence-classification model has no 'score' or 'classifier' head"
        )
    lora = PeftSettings.from_record(the_plan.peft)  # the method, its rank and targets, as planned
    model = attach_lora(
        base, lora, gradient_checkpointing=the_plan.gradient_checkpointing, task="classification",
        modules_to_save=heads, model_path=model_path, quantization=the_plan.quantization,
    )  # fmt: skip
    model.train()
    for callback in config.callbacks:
        if hasattr(callback, "on_model_ready"):
            callback.on_model_ready(model)

    effective = the_plan.effective_batch_size
    total_steps = config.max_steps or max(
        1, math.ceil(config.epochs * steps_per_epoch(len(train_examples), effective))
    )
    grad_scaler = make_grad_scaler(device, the_plan.compute_dtype)
    optimizer, scheduler, state = start_or_restore(
        config, the_plan, model, total_steps, store, latest, out, grad_scaler
    )
    cuda_half = device.type == "cuda" and the_plan.compute_dtype != "fp32"
    runner = ClassifierStepRunner(
        model, optimizer, scheduler, train_examples, pad_token_id=tokenizer.pad_token_id, device=device,
        max_grad_norm=config.max_grad_norm, autocast_dtype=torch_dtype(the_plan.compute_dtype) if cuda_half else None,
        grad_scaler=grad_scaler,
        class_weights=torch.tensor(weights, device=device) if weights else None,
    )  # fmt: skip
    checkpointer = Checkpointer(
        store, model, optimizer, scheduler,
        metadata=checkpoint_metadata(identity, the_plan, store, run_config),
        every_seconds=config.save_every_minutes * 60 if config.save_every_minutes else the_plan.checkpoint_every_seconds,
        every_steps=config.save_every_steps, grad_scaler=grad_scaler,
    )  # fmt: skip
    eval_every = config.eval_every or max(1, total_steps // 5)
    ctx = SimpleNamespace(config=config, out=out, runner=runner, checkpointer=checkpointer, state=state, total_steps=total_steps,
                          effective=effective, eval_every=eval_every, eval_examples=eval_examples, mapping=data.mapping,
                          pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    train_seconds = probe_train_and_checkpoint(
        runner, state, train_examples, checkpointer, store, lambda: _run_steps(ctx)
    )

    evaluation, matrix_png = None, None
    metrics = run_metrics(state, time.time() - started, train_seconds, checkpointer)
    metrics.pop("eval_perplexity", None)
    if eval_examples:
        evaluation, eval_loss = evaluate_examples(
            model,
            eval_examples,
            data.mapping,
            tokenizer.pad_token_id,
            device,
            state.micro_batch_size,
            runner.autocast_dtype,
        )
        evaluation["majority_baseline_accuracy"] = majority_baseline(
            data.train_ids, [e.label for e in eval_examples]
        )
        metrics.update(
            eval_loss=round(eval_loss, 6), eval_accuracy=evaluation["accuracy"], eval_macro_f1=evaluation["macro_f1"],
            majority_baseline_accuracy=evaluation["majority_baseline_accuracy"],
        )  # fmt: skip
        log.info("held-out evaluation:\n%s", format_classification_table(evaluation))
        matrix_png = plot_confusion_matrix(
            evaluation["confusion_matrix"],
            data.mapping.names,
            out / CONFUSION_PLOT,
            title=f"{source.display_name} LoRA classifier",
        )
    save_adapter(model, out, model.qlora_lite_initial_adapter)
    tokenizer.save_pretrained(out)
    write_json_atomic(out / LABELS_FILE, data.mapping.to_file(tokenizer.pad_token_id))
    plot = plot_loss(
        state.history, state.eval_history, out / LOSS_PLOT, title=f"{source.display_name} LoRA classifier"
    )
    prepared = PreparedData(
        data.spec,
        data.fingerprint,
        train_examples,
        eval_examples,
        SimpleNamespace(n_truncated=n_truncated, n_dropped=0),
        data.n_records,
    )
    record = build_run_record(
        config=config, model_path=source, plan=the_plan, lora=lora, prepared=prepared, identity=identity,
        total_steps=total_steps, eval_every=eval_every, metrics=metrics, state=state, hardware=hardware,
    )  # fmt: skip
    record.update(
        task="classification", labels=data.mapping.to_file(tokenizer.pad_token_id), class_weights=weights,
        label_distribution=data.distribution(), evaluation=evaluation, head_modules=heads,
    )  # fmt: skip
    if hasattr(data.source, "describe"):  # a Hub data set: its id and the commit the records came from
        record["data"].update(data.source.describe())
    write_json_atomic(out / RUN_RECORD, record)
    log.info("saved the adapter, head and run record in %s", out)
    return ClassifierResult(
        out, out, out / RUN_RECORD, plot, metrics, the_plan, latest.step if latest else None,
        labels=data.mapping.names, evaluation=evaluation, confusion_matrix=matrix_png,
    )  # fmt: skip


def _run_steps(ctx: SimpleNamespace) -> None:
    """Optimizer steps from `state.step` to the end: periodic held-out loss/accuracy, step log, checkpoints."""
    from tqdm.auto import tqdm

    state, runner = ctx.state, ctx.runner
    n = len(runner.examples)
    periodic = ctx.eval_examples[:PERIODIC_EVAL_EXAMPLES]
    bar = tqdm(
        total=ctx.total_steps,
        initial=state.step,
        disable=not ctx.config.progress,
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while state.step < ctx.total_steps:
            indices = step_examples(state.step, n, ctx.effective, ctx.config.seed)
            t0 = time.perf_counter()
            loss = runner.run(indices, state)
            state.step += 1
            state.examples_seen += len(indices)
            state.tokens_seen += sum(len(runner.examples[i].input_ids) for i in indices)
            row = {
                "step": state.step, "loss": round(loss, 6), "learning_rate": runner.scheduler.get_last_lr()[0],
                "examples_seen": state.examples_seen, "tokens_seen": state.tokens_seen,
                "micro_batch_size": state.micro_batch_size, "seconds": round(time.perf_counter() - t0, 4),
            }  # fmt: skip
            state.history.append(row)
            append_step_log(ctx.out, row)
            if periodic and (state.step % ctx.eval_every == 0 or state.step == ctx.total_steps):
                metrics, eval_loss = evaluate_examples(
                    runner.model,
                    periodic,
                    ctx.mapping,
                    ctx.pad_token_id,
                    runner.device,
                    state.micro_batch_size,
                    runner.autocast_dtype,
                )
                entry = {
                    "step": state.step,
                    "eval_loss": round(eval_loss, 6),
                    "eval_accuracy": round(metrics["accuracy"], 4),
                }
                state.eval_history.append(entry)
                append_step_log(ctx.out, entry)
            # Saves when due, runs the callbacks; interrupted (Ctrl-C, SIGTERM): saves, then stops.
            ctx.checkpointer.at_step_end(state, ctx.total_steps, ctx.config.callbacks)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()


__all__ = ["ClassifierResult", "run_classifier", "train_classifier"]
