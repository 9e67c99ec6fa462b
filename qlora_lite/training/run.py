"""`train()`: check the output -> plan -> load -> resume or start -> probe -> loop -> save.

Each stage lives in its own module; this one only wires them together.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_lite.checkpoint.resume import Checkpointer, run_identity
from qlora_lite.checkpoint.store import CheckpointInfo
from qlora_lite.config import TrainConfig, make_config
from qlora_lite.data import encoding as encode_mod
from qlora_lite.data import formats as data_mod
from qlora_lite.data.hub_dataset import HubDataset, pin_data_source
from qlora_lite.data.templates import apply_chat_template_choice, end_of_turn, generation_config_for
from qlora_lite.errors import UserError
from qlora_lite.model.loading import (
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
from qlora_lite.training import distributed as dp
from qlora_lite.training.loop import (
    StepRunner,
    Throughput,
    evaluate_loss,
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

# Planner knobs a resumed run keeps from its checkpoint (micro-batch/accumulation may be re-split).
KEPT_ON_RESUME = (
    "quantization", "double_quant", "compute_dtype", "effective_batch_size", "max_seq_length",
    "gradient_checkpointing", "optimizer", "attn_implementation", "lora_r", "lora_target_modules", "peft",
)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    run_record: Path
    loss_plot: Path | None
    metrics: dict[str, Any]
    plan: Any = field(repr=False)
    resumed_from_step: int | None = None


@dataclass
class PreparedData:
    spec: Any
    fingerprint: str
    train: list
    eval: list
    stats: Any
    n_records: int
    eval_conversations: list = field(default_factory=list)
    router_sample: list = field(default_factory=list)  # training prompts kept in the record for routing


def show_progress_messages() -> None:
    """Make the plan and progress messages visible in a notebook or script that configured no logging.

    Nothing changes when the application (the CLI, pytest, the user) has set up logging itself.
    """
    package = logging.getLogger("qlora_lite")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def train(model: str, data: Any, output_dir: str, **overrides: Any) -> TrainResult:
    """Fine-tune `model` on `data` with LoRA/QLoRA and save the adapter in `output_dir`.

    `overrides` are TrainConfig fields (e.g. max_steps=60, learning_rate=1e-4, micro_batch_size=4);
    planner knobs left unset are chosen by the planner, which prints why. Re-running the same call after
    an interruption resumes from the newest verified checkpoint.
    """
    show_progress_messages()
    return run(make_config(model, data, output_dir, **overrides))


def prepare_data(config: TrainConfig, tokenizer, max_seq_length: int | None, records, spec) -> PreparedData:
    """Split and encode already loaded records (the file is read once per run, in `run`)."""
    conversations = data_mod.to_conversations(records, spec)
    train_items, eval_items = data_mod.split_train_eval(conversations, config.eval_fraction, seed=config.seed)
    train_examples, stats = encode_mod.encode_dataset(
        train_items, tokenizer, max_seq_length, train_on=config.train_on
    )
    eval_examples, _ = encode_mod.encode_dataset(
        eval_items, tokenizer, max_seq_length, train_on=config.train_on
    )
    fingerprint = data_mod.fingerprint(records, spec)
    sample = data_mod.prompt_sample(train_items)
    return PreparedData(
        spec, fingerprint, train_examples, eval_examples, stats, len(records), eval_items, sample
    )


def _plan(
    model_path: Any,
    lengths: list[int],
    hardware: HardwareProfile,
    config: TrainConfig,
    saved: dict | None,
    world_size: int = 1,
):
    from qlora_lite.planner.planning import plan as make_plan

    fixed = {**config.fixed_knobs(), "world_size": world_size}
    if saved is not None:
        # A resumed run keeps its plan; only the micro-batch split may change if this machine is smaller.
        kept = {k: saved[k] for k in KEPT_ON_RESUME if k in saved}
        if isinstance(kept.get("lora_target_modules"), list):
            kept["lora_target_modules"] = tuple(kept["lora_target_modules"])
        fixed = {**{k: v for k, v in fixed.items() if k in ("max_memory", "world_size")}, **kept}
        the_plan = make_plan(
            model_path, data=lengths, hardware=hardware, micro_batch_size=saved["micro_batch_size"], **fixed
        )
        if not the_plan.fits:
            log.warning(
                "the saved micro-batch %d does not fit here: re-planning the split", saved["micro_batch_size"]
            )
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


def run(config: TrainConfig) -> TrainResult:
    """One run; under torchrun / accelerate launch, this process's rank of it (see training/distributed.py)."""
    ranks, started_group = dp.init_ranks()
    try:
        return _run(config, ranks)
    finally:
        dp.close_ranks(started_group)


def _run(config: TrainConfig, ranks: dp.Ranks) -> TrainResult:
    data_source = pin_data_source(
        config.data, config.data_config, config.data_split
    )  # a Hub data set: pinned to its commit before reading
    records, spec = data_mod.load_dataset_for_training(
        data_source, format=config.format, columns=config.columns
    )
    if spec.task == "classification":  # labelled texts go to the classifier trainer
        if ranks.active:
            raise UserError("the classifier trains in one process: start it without torchrun/--gpus")
        from qlora_lite.training.classifier import run_classifier

        return run_classifier(config)
    # Rank 0 locks the run folder for the whole run; its checkpoint store is always closed.
    with RunFolder(config, main=ranks.is_main) as folder:
        return _run_in(config, ranks, data_source, records, spec, folder)


def _run_in(
    config: TrainConfig, ranks: dp.Ranks, data_source, records: list, spec, folder: RunFolder
) -> TrainResult:
    started = time.time()
    out = folder.path
    dp.barrier(ranks)  # rank 0 alone prepares (and locks) the run folder; the others wait until it is ready
    hardware = config.hardware if isinstance(config.hardware, HardwareProfile) else None
    if hardware is None:
        from qlora_lite.planner.profiles import get_profile

        hardware = get_profile(config.hardware) if config.hardware else detect(out)
    hardware = dp.rank_hardware(hardware, ranks)  # each rank plans for its own device
    source = resolve_model_source(config.model, config.model_revision)  # a Hub id: pinned to a commit
    model_path = source.name
    check_has_weights(model_path)
    tokenizer = load_tokenizer(source)
    template = apply_chat_template_choice(tokenizer, config.chat_template)

    unbounded = prepare_data(config, tokenizer, None, records, spec)
    identity = run_identity(config, model_identity(source), unbounded.fingerprint)
    finished = dp.from_main(finished_record(out, identity) if ranks.is_main else None, ranks)
    if finished is not None:
        log.info(
            "%s already holds this run, finished at step %d: nothing to do", out, finished["metrics"]["steps"]
        )
        plot = out / LOSS_PLOT
        return TrainResult(
            out, out, out / RUN_RECORD, plot if plot.exists() else None, finished["metrics"], finished["plan"]
        )

    store = folder.open_store() if ranks.is_main else dp.FollowerStore()
    latest: CheckpointInfo | None = resume_point(config, store, identity) if ranks.is_main else None
    run_config = config.to_record()
    if ranks.is_main:
        write_json_atomic(out / RUN_CONFIG, run_config)
    latest, reader = dp.share_latest(store, latest, ranks)

    saved_plan = latest.metadata.get("plan") if latest else None
    # Rank 0 plans; the others keep its choices and fit only their micro-batch to their own device.
    saved_plan = saved_plan if ranks.is_main else dp.from_main(None, ranks)
    the_plan = _plan(source, unbounded.stats.lengths, hardware, config, saved_plan, ranks.world_size)
    if ranks.is_main:
        dp.from_main(the_plan.to_dict(), ranks)
    dp.check_world_size(
        the_plan.effective_batch_size, ranks, latest.metadata.get("world_size", 1) if latest else None,
        config.lora_dropout,
    )  # fmt: skip
    prepared = prepare_data(config, tokenizer, the_plan.max_seq_length, records, spec)

    seed_everything(config.seed)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
    )
    base = load_base_model(
        model_path,
        revision=source.revision,  # the commit the plan and the run identity name
        quantization=the_plan.quantization,
        double_quant=the_plan.double_quant,
        compute_dtype=the_plan.compute_dtype,
        accelerator=accelerator,
        attn_implementation=the_plan.attn_implementation,
    )
    lora = PeftSettings.from_record(the_plan.peft)  # the method, its rank and targets, as planned
    model = attach_lora(
        base, lora, gradient_checkpointing=the_plan.gradient_checkpointing, model_path=model_path,
        quantization=the_plan.quantization,
    )  # fmt: skip
    model.train()
    for callback in config.callbacks:
        if hasattr(callback, "on_model_ready"):
            callback.on_model_ready(model)

    total_steps = config.max_steps or max(
        1, math.ceil(config.epochs * steps_per_epoch(len(prepared.train), the_plan.effective_batch_size))
    )
    grad_scaler = make_grad_scaler(device, the_plan.compute_dtype)
    optimizer, scheduler, state = start_or_restore(
        config, the_plan, model, total_steps, reader, latest, out if ranks.is_main else None, grad_scaler
    )
    dp.broadcast_parameters(model, ranks)

    autocast_dtype = (
        None
        if device.type == "cpu" or the_plan.compute_dtype == "fp32"
        else torch_dtype(the_plan.compute_dtype)
    )
    runner = StepRunner(
        model, optimizer, scheduler, prepared.train, pad_token_id=tokenizer.pad_token_id, device=device,
        max_grad_norm=config.max_grad_norm, autocast_dtype=autocast_dtype,
        grad_scaler=grad_scaler,
        data_parallel=dp.DataParallel(ranks, [len(e.input_ids) for e in prepared.train], config.seed) if ranks.active else None,
    )  # fmt: skip
    every_seconds = (
        config.save_every_minutes * 60 if config.save_every_minutes else the_plan.checkpoint_every_seconds
    )
    checkpointer = Checkpointer(
        store, model, optimizer, scheduler,
        metadata={**checkpoint_metadata(identity, the_plan, store, run_config), "world_size": ranks.world_size},
        every_seconds=every_seconds, every_steps=config.save_every_steps, grad_scaler=grad_scaler,
    )  # fmt: skip
    if ranks.active:
        checkpointer = dp.MainRankCheckpointer(checkpointer, ranks)
    eval_every = config.eval_every or max(1, total_steps // 5)
    train_seconds = probe_train_and_checkpoint(
        runner,
        state,
        prepared.train,
        checkpointer,
        store,
        lambda: _run_steps(
            config, out if ranks.is_main else None, prepared, runner, checkpointer, state, total_steps,
            the_plan.effective_batch_size, eval_every, tokenizer,
        ),
    )  # fmt: skip

    if not ranks.is_main:
        dp.barrier(ranks)  # rank 0 writes the adapter, the record and pushes
        metrics = run_metrics(state, time.time() - started, train_seconds, checkpointer)
        return TrainResult(
            out, out, out / RUN_RECORD, None, metrics, the_plan, latest.step if latest else None
        )
    save_adapter(model, out, model.qlora_lite_initial_adapter)
    tokenizer.save_pretrained(out)
    generation_config_for(model, tokenizer).save_pretrained(out)  # stop at the learned end-of-turn too
    generations = None
    if config.eval_generations or config.sample_generations:
        from qlora_lite.training.generation_eval import before_after

        generations = before_after(
            model, tokenizer, prepared.eval_conversations, config.eval_generations, config.sample_generations
        )
    metrics = run_metrics(state, time.time() - started, train_seconds, checkpointer)
    if generations and "after" in generations:
        metrics["exact_match"] = generations["after"]["exact_match"]
        metrics["contains_match"] = generations["after"]["contains_match"]
    plot = plot_loss(state.history, state.eval_history, out / LOSS_PLOT, title=f"{source.display_name} LoRA")
    record = build_run_record(
        config=config, model_path=source, plan=the_plan, lora=lora, prepared=prepared, identity=identity,
        total_steps=total_steps, eval_every=eval_every, metrics=metrics, state=state, hardware=hardware,
    )  # fmt: skip
    record["generation_eval"] = generations
    record["world_size"] = ranks.world_size
    record["chat_template"] = {"template": template, "end_of_turn": end_of_turn(tokenizer)}
    if isinstance(data_source, HubDataset):
        record["data"].update(data_source.describe())  # the id and the commit the records came from
    write_json_atomic(out / RUN_RECORD, record)
    log.info("saved the adapter and run record in %s", out)
    if config.push_to_hub:
        from qlora_lite.hub.push import push

        pushed = push(out, config.push_to_hub, private=config.hub_private)
        log.info("pushed to %s", pushed.commit_url)
    dp.barrier(ranks)
    return TrainResult(out, out, out / RUN_RECORD, plot, metrics, the_plan, latest.step if latest else None)


def _run_steps(
    config,
    out,
    prepared,
    runner,
    checkpointer,
    state,
    total_steps,
    effective_batch_size,
    eval_every,
    tokenizer,
) -> None:
    """The optimizer steps from `state.step` to `total_steps`: eval, step log, checkpoints, progress bar.

    `out` is None on ranks other than 0: they neither log, evaluate nor show progress."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    throughput = Throughput()
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not config.progress or out is None,
        unit="step",
        dynamic_ncols=True,
    )
    # Log lines (checkpoints saved, evals) print above the bar instead of breaking it.
    with logging_redirect_tqdm(loggers=[logging.getLogger(), logging.getLogger("qlora_lite")]):
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
                if out is not None:
                    append_step_log(out, row)
                if out is not None and (state.step % eval_every == 0 or state.step == total_steps):
                    eval_loss = evaluate_loss(
                        runner.model,
                        prepared.eval,
                        tokenizer.pad_token_id,
                        runner.device,
                        state.micro_batch_size,
                        runner.autocast_dtype,
                    )
                    if eval_loss is not None:
                        state.eval_history.append({"step": state.step, "eval_loss": round(eval_loss, 6)})
                        append_step_log(out, state.eval_history[-1])
                # Saves when due, runs the callbacks; interrupted (Ctrl-C, SIGTERM): saves, then stops.
                checkpointer.at_step_end(state, total_steps, config.callbacks)
                bar.set_postfix(
                    loss=f"{loss:.4f}", tok_s=f"{throughput.tokens_per_second:.0f}", refresh=False
                )
                bar.update(1)
        finally:
            bar.close()
