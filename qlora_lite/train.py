"""`train()`: setup -> plan -> load -> probe -> loop -> save. Each stage lives in its own module."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from . import encode as encode_mod
from .config import TrainConfig, make_config
from .errors import UserError
from .hardware import HardwareProfile, detect
from .loop import (
    LoopState,
    OutOfMemoryAtMicroBatchOne,
    StepRunner,
    Throughput,
    evaluate_loss,
    step_examples,
    steps_per_epoch,
)
from .model import LoraSettings, attach_lora, load_base_model, load_tokenizer, resolve_model, torch_dtype
from .record import (
    LOSS_PLOT,
    RUN_RECORD,
    STEP_LOG,
    append_step_log,
    library_versions,
    model_identity,
    plot_loss,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# Files that mark a folder as holding a finished or started run.
RUN_MARKERS = (RUN_RECORD, "adapter_config.json", STEP_LOG)


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    run_record: Path
    loss_plot: Path | None
    metrics: dict[str, Any]
    plan: Any = field(repr=False)


@dataclass
class PreparedData:
    spec: Any
    fingerprint: str
    train: list
    eval: list
    stats: Any
    n_records: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _resolve_hardware(config: TrainConfig) -> HardwareProfile:
    if config.hardware is None:
        return detect(config.output_dir)
    if isinstance(config.hardware, HardwareProfile):
        return config.hardware
    from .profiles import get_profile

    return get_profile(str(config.hardware))


def _check_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a folder for the run")
    held = [name for name in RUN_MARKERS if (out / name).exists()]
    if held and not config.overwrite:
        raise UserError(
            f"output folder {out} already holds a run ({', '.join(held)}): choose another --output, "
            "or pass --overwrite (overwrite=True) to replace it"
        )
    if held:
        for name in (*RUN_MARKERS, "adapter_model.safetensors", LOSS_PLOT):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_data(config: TrainConfig, tokenizer, max_seq_length: int | None) -> PreparedData:
    records, spec = data_mod.load_dataset_for_training(
        config.data, format=config.format, columns=config.columns
    )
    if spec.task != "causal_lm":
        raise UserError(
            f"{spec.name} data ({spec.reason}) is a classification task; it is not supported by train() yet"
        )
    conversations = data_mod.to_conversations(records, spec)
    train_items, eval_items = data_mod.split_train_eval(conversations, config.eval_fraction, seed=config.seed)
    train_examples, stats = encode_mod.encode_dataset(
        train_items, tokenizer, max_seq_length, train_on=config.train_on
    )
    eval_examples, _ = encode_mod.encode_dataset(
        eval_items, tokenizer, max_seq_length, train_on=config.train_on
    )
    if not train_examples:
        raise UserError(
            f"no training example has a response token left (of {len(records)} records): check the data"
        )
    return PreparedData(
        spec, data_mod.fingerprint(records, spec), train_examples, eval_examples, stats, len(records)
    )


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    classes = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    if name not in classes:
        raise UserError(f"optimizer {name!r} is not one of adamw_torch, {', '.join(classes)}")
    return classes[name](params, lr=lr, weight_decay=weight_decay)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train(model: str, data: Any, output_dir: str, **overrides: Any) -> TrainResult:
    """Fine-tune `model` on `data` with LoRA/QLoRA and save the adapter in `output_dir`.

    `overrides` are TrainConfig fields (e.g. max_steps=60, learning_rate=1e-4, micro_batch_size=4);
    planner knobs left unset are chosen by the planner, which prints why.
    """
    config = make_config(model, data, output_dir, **overrides)
    return run(config)


def run(config: TrainConfig) -> TrainResult:
    started = time.time()
    out = _check_output_dir(config)
    hardware = _resolve_hardware(config)
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    encode_mod.ensure_chat_template(tokenizer)

    # Plan from the untruncated lengths, then encode at the planned length.
    unbounded = prepare_data(config, tokenizer, max_seq_length=None)
    from .plan import plan as make_plan

    the_plan = make_plan(model_path, data=unbounded.stats.lengths, hardware=hardware, **config.fixed_knobs())
    log.info("plan:\n%s", the_plan.explain())
    if not the_plan.fits:
        raise UserError(
            f"the run does not fit in {hardware.name} memory even as planned; {getattr(the_plan, 'nearest_fit', '')}"
        )
    prepared = prepare_data(config, tokenizer, max_seq_length=the_plan.max_seq_length)

    seed_everything(config.seed)
    accelerator = hardware.accelerator if config.hardware is None else detect(config.output_dir).accelerator
    device = (
        torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
    )
    base = load_base_model(
        model_path,
        quantization=the_plan.quantization,
        double_quant=the_plan.double_quant,
        compute_dtype=the_plan.compute_dtype,
        accelerator=accelerator,
        attn_implementation=the_plan.attn_implementation,
    )
    lora = LoraSettings(
        r=the_plan.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=the_plan.lora_target_modules
        if isinstance(the_plan.lora_target_modules, str)
        else tuple(the_plan.lora_target_modules),
    )
    peft_model = attach_lora(base, lora, gradient_checkpointing=the_plan.gradient_checkpointing)
    peft_model.train()
    for callback in config.callbacks:
        if hasattr(callback, "on_model_ready"):
            callback.on_model_ready(peft_model)

    per_epoch = steps_per_epoch(len(prepared.train), the_plan.effective_batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(the_plan.optimizer, trainable, config.learning_rate, config.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    autocast_dtype = (
        None
        if device.type == "cpu" or the_plan.compute_dtype == "fp32"
        else torch_dtype(the_plan.compute_dtype)
    )
    scaler = (
        torch.amp.GradScaler("cuda") if device.type == "cuda" and the_plan.compute_dtype == "fp16" else None
    )
    state = LoopState(micro_batch_size=the_plan.micro_batch_size)
    runner = StepRunner(
        peft_model,
        optimizer,
        scheduler,
        prepared.train,
        pad_token_id=tokenizer.pad_token_id,
        device=device,
        max_grad_norm=config.max_grad_norm,
        autocast_dtype=autocast_dtype,
        grad_scaler=scaler,
    )
    eval_every = config.eval_every or max(1, total_steps // 5)

    # Probe: the longest examples, one micro-batch, forward+backward, no update. An OOM here backs off
    # before any real step runs, instead of 3 hours in when the longest batch finally comes up.
    longest = sorted(range(len(prepared.train)), key=lambda i: -len(prepared.train[i].input_ids))
    try:
        runner.run(longest[: state.micro_batch_size], state, apply=False)
        _run_steps(
            config,
            out,
            prepared,
            runner,
            state,
            total_steps,
            the_plan.effective_batch_size,
            eval_every,
            device,
            autocast_dtype,
            tokenizer,
        )
    except OutOfMemoryAtMicroBatchOne as exc:
        raise UserError(str(exc)) from exc

    seconds = time.time() - started
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    final_eval = state.eval_history[-1]["eval_loss"] if state.eval_history else None
    metrics = {
        "train_loss": state.history[-1]["loss"] if state.history else None,
        "eval_loss": final_eval,
        "eval_perplexity": math.exp(final_eval) if final_eval is not None and final_eval < 50 else None,
        "steps": state.step,
        "examples_seen": state.examples_seen,
        "tokens_seen": state.tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(
            state.tokens_seen / max(1e-9, sum(r["seconds"] for r in state.history)), 2
        ),
        "oom_backoffs": state.oom_backoffs,
        "final_micro_batch_size": state.micro_batch_size,
    }
    plot = plot_loss(
        state.history, state.eval_history, out / LOSS_PLOT, title=f"{Path(model_path).name} LoRA"
    )
    record = {
        "qlora_lite_run": 1,
        "task": "causal_lm",
        "base_model": model_identity(model_path),
        "quantization": {
            "method": the_plan.quantization,
            "double_quant": the_plan.double_quant,
            "compute_dtype": the_plan.compute_dtype,
        },
        "lora": {
            "r": lora.r,
            "alpha": lora.lora_alpha,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules,
        },
        "plan": the_plan.to_dict(),
        "hyperparameters": {
            "max_steps": config.max_steps,
            "epochs": config.epochs,
            "total_steps": total_steps,
            "learning_rate": config.learning_rate,
            "lr_scheduler": config.lr_scheduler,
            "warmup_ratio": config.warmup_ratio,
            "weight_decay": config.weight_decay,
            "max_grad_norm": config.max_grad_norm,
            "seed": config.seed,
            "eval_every": eval_every,
            "train_on": config.train_on,
        },
        "data": {
            "source": str(config.data)
            if isinstance(config.data, (str, Path))
            else type(config.data).__name__,
            "format": prepared.spec.name,
            "columns": prepared.spec.columns,
            "format_reason": prepared.spec.reason,
            "fingerprint": prepared.fingerprint,
            "records": prepared.n_records,
            "train_examples": len(prepared.train),
            "eval_examples": len(prepared.eval),
            "truncated_examples": prepared.stats.n_truncated,
            "dropped_examples": prepared.stats.n_dropped,
        },
        "metrics": metrics,
        "history": state.history,
        "eval_history": state.eval_history,
        "hardware": hardware.to_dict(),
        "versions": library_versions(),
        "created_unix": int(time.time()),
    }
    write_json_atomic(out / RUN_RECORD, record)
    log.info("saved the adapter and run record in %s", out)
    return TrainResult(out, out, out / RUN_RECORD, plot, metrics, the_plan)


def _run_steps(
    config,
    out,
    prepared,
    runner,
    state,
    total_steps,
    effective_batch_size,
    eval_every,
    device,
    autocast_dtype,
    tokenizer,
) -> None:
    """The optimizer steps from `state.step` to `total_steps`, with eval, the step log and the progress bar."""
    throughput = Throughput()
    bar = _progress_bar(total_steps, state.step, config.progress)
    try:
        while state.step < total_steps:
            indices = step_examples(state.step, len(prepared.train), effective_batch_size, config.seed)
            t0 = time.perf_counter()
            loss = runner.run(indices, state)
            seconds = time.perf_counter() - t0
            tokens = sum(len(prepared.train[i].input_ids) for i in indices)
            state.step += 1
            state.examples_seen += len(indices)
            state.tokens_seen += tokens
            throughput.add(tokens)
            row = {
                "step": state.step,
                "loss": round(loss, 6),
                "learning_rate": runner.scheduler.get_last_lr()[0],
                "examples_seen": state.examples_seen,
                "tokens_seen": state.tokens_seen,
                "micro_batch_size": state.micro_batch_size,
                "seconds": round(seconds, 4),
            }
            state.history.append(row)
            append_step_log(out, row)
            if state.step % eval_every == 0 or state.step == total_steps:
                eval_loss = evaluate_loss(
                    runner.model,
                    prepared.eval,
                    tokenizer.pad_token_id,
                    device,
                    state.micro_batch_size,
                    autocast_dtype,
                )
                if eval_loss is not None:
                    state.eval_history.append({"step": state.step, "eval_loss": round(eval_loss, 6)})
                    append_step_log(out, {"step": state.step, "eval_loss": round(eval_loss, 6)})
            for callback in config.callbacks:
                if hasattr(callback, "on_step_end"):
                    callback.on_step_end(state)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{throughput.tokens_per_second:.0f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
