"""The one trainer: `run(config, task)` for every task (causal LM, classifier).

check the data -> output folder -> hardware -> finished already? -> checkpoint store -> plan -> encode ->
model + LoRA -> resume or start -> probe -> loop with checkpoints -> save -> the task's finish -> record -> push.
What differs between tasks goes through the task interface (qlora_lite.training.tasks); each stage lives in its
own module and this one wires them together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from qlora_lite.checkpoint.resume import Checkpointer, run_identity
from qlora_lite.checkpoint.store import CheckpointInfo
from qlora_lite.config import TrainConfig
from qlora_lite.errors import UserError
from qlora_lite.model import loftq_base
from qlora_lite.model.loading import attach_lora, check_has_weights, load_tokenizer, torch_dtype
from qlora_lite.model.peft_init import save_adapter
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.model.source import resolve_model_source
from qlora_lite.options import KEPT_ON_RESUME
from qlora_lite.planner.hardware import HardwareProfile
from qlora_lite.planner.planning import Plan, make_plan
from qlora_lite.planner.profiles import resolve_hardware
from qlora_lite.training import distributed as dp
from qlora_lite.training.early_stopping import BEST_ADAPTER, BestTracker
from qlora_lite.training.loop import StepRunner, Throughput, step_examples, steps_per_epoch
from qlora_lite.training.peak_of_run import PeakOfRun
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
from qlora_lite.training.tasks import PreparedData, Task, TrainResult  # noqa: F401 (re-exported)
from qlora_lite.training.tracking import Trackers, parse_report_to

log = logging.getLogger(__name__)


def plan_run(
    model_path: Any,
    lengths: list[int],
    hardware: HardwareProfile,
    config: TrainConfig,
    saved: dict | None,
    task_knobs: dict[str, Any],
    world_size: int = 1,
) -> Plan:
    """The plan of this run; a resumed run keeps its saved plan (only the micro-batch split may change)."""
    inputs = {**task_knobs, "world_size": world_size}
    fixed = {**config.fixed_knobs(), **inputs}
    if saved is not None:
        kept = {
            k: saved[k] for k in (*KEPT_ON_RESUME, "peft") if k in saved
        }  # and the PEFT method as planned
        kept = {"precision": "upcast", **kept}  # checkpoints from before these knobs: what they trained with
        if task_knobs.get("task", "causal_lm") == "causal_lm":
            kept = {"packing": False, "chunked_loss": False, **kept}
        if isinstance(kept.get("lora_target_modules"), list):
            kept["lora_target_modules"] = tuple(kept["lora_target_modules"])
        fixed = {**{k: v for k, v in fixed.items() if k == "max_memory"}, **kept, **inputs}
        the_plan = make_plan(
            model_path, lengths, hardware, **{**fixed, "micro_batch_size": saved["micro_batch_size"]}
        )
        if not the_plan.fits:
            log.warning(
                "the saved micro-batch %d does not fit here: re-planning the split", saved["micro_batch_size"]
            )
            the_plan = make_plan(model_path, lengths, hardware, **fixed)
    else:
        the_plan = make_plan(model_path, lengths, hardware, **fixed)
    log.info("plan:\n%s", the_plan.explain())
    if not the_plan.fits:
        nearest = f"; nearest plan that fits: {the_plan.nearest_fit}" if the_plan.nearest_fit else ""
        raise UserError(
            f"the run does not fit in {hardware.name} memory{nearest}. {the_plan.message}".strip()
        )
    return the_plan


def run(config: TrainConfig, task: Task) -> TrainResult:
    """Train `task` as `config` says, resuming from the newest verified checkpoint of the same run.

    Under torchrun / accelerate launch, this is this process's rank of the run (training/distributed.py)."""
    ranks, started_group = dp.init_ranks()
    try:
        if ranks.active and not task.distributed:
            raise UserError(f"the {task.name} task trains in one process: start it without torchrun/--gpus")
        if ranks.active and config.early_stopping_patience is not None:
            # Evaluation runs on rank 0 alone; its stop decision is not shared with the other ranks yet.
            raise UserError(
                "--early-stopping-patience trains in one process: start it without torchrun/--gpus"
            )
        with contextlib.ExitStack() as cleanup:  # the run folder's lock and checkpoint store, always released
            return _run(config, task, ranks, cleanup)
    finally:
        dp.close_ranks(started_group)


def _run(config: TrainConfig, task: Task, ranks: dp.Ranks, cleanup: contextlib.ExitStack) -> TrainResult:
    started = time.time()
    data = task.read(config)  # every data problem is reported before a file is written
    source = resolve_model_source(config.model, config.model_revision)  # a Hub id: pinned to a commit
    check_has_weights(source.name)  # a local folder with a config.json alone cannot train
    tokenizer = load_tokenizer(source)
    identity = {**run_identity(config, model_identity(source), data.fingerprint), **data.identity}
    # Rank 0 alone writes the run folder, locked against a second process; the others wait until it is ready.
    folder = cleanup.enter_context(RunFolder(config, main=ranks.is_main, task_files=task.files))
    out = folder.path
    dp.barrier(ranks)
    hardware = dp.rank_hardware(
        resolve_hardware(config.hardware, out), ranks
    )  # each rank plans for its device
    finished = dp.from_main(finished_record(out, identity) if ranks.is_main else None, ranks)
    if finished is not None:
        log.info(
            "%s already holds this run, finished at step %d: nothing to do", out, finished["metrics"]["steps"]
        )
        plot = out / LOSS_PLOT
        return task.result_type(
            out, out, out / RUN_RECORD, plot if plot.exists() else None, finished["metrics"], finished["plan"],
            **task.result_fields(out, finished),
        )  # fmt: skip

    store = folder.open_store() if ranks.is_main else dp.FollowerStore()
    latest: CheckpointInfo | None = (
        resume_point(config, store, identity, task.check_checkpoint) if ranks.is_main else None
    )
    run_config = {**config.to_record(), **data.run_config}
    if ranks.is_main:
        write_json_atomic(out / RUN_CONFIG, run_config)
    latest, reader = dp.share_latest(store, latest, ranks)

    lengths = task.prepare(tokenizer, None).lengths
    saved_plan = latest.metadata.get("plan") if latest else None
    # Rank 0 plans; the others keep its choices and fit only their micro-batch to their own device.
    saved_plan = saved_plan if ranks.is_main else dp.from_main(None, ranks)
    the_plan = plan_run(source, lengths, hardware, config, saved_plan, task.plan_knobs(), ranks.world_size)
    if ranks.is_main:
        dp.from_main(the_plan.to_dict(), ranks)
    dp.check_world_size(
        the_plan.effective_batch_size, ranks, latest.metadata.get("world_size", 1) if latest else None,
        config.lora_dropout,
    )  # fmt: skip
    prepared = task.prepare(tokenizer, the_plan.max_seq_length)

    seed_everything(config.seed)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
    )
    base, attach_kwargs = task.load_model(source, the_plan, accelerator, tokenizer)
    lora = PeftSettings.from_record(the_plan.peft)  # the method, its rank and targets, as planned
    # LoftQ past one round rewrites the 4-bit base: a resume takes the saved one instead of recomputing it.
    own_base = loftq_base.needs_own_base(lora)
    model = attach_lora(
        base, lora, gradient_checkpointing=the_plan.gradient_checkpointing, model_path=source.name,
        quantization=the_plan.quantization, precision=the_plan.precision,
        own_init=not (own_base and latest is not None), **attach_kwargs,
    )  # fmt: skip
    base_entry = _own_base(model, tokenizer, lora, out, store, latest, ranks, source) if own_base else None
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
    half = device.type != "cpu" and the_plan.compute_dtype != "fp32"
    autocast_dtype = torch_dtype(the_plan.compute_dtype) if half else None
    objective = task.objective(
        device, model, the_plan, prepared.train, tokenizer.pad_token_id, autocast_dtype
    )
    runner = StepRunner(
        model, optimizer, scheduler, prepared.train, pad_token_id=tokenizer.pad_token_id, device=device,
        objective=objective, max_grad_norm=config.max_grad_norm, autocast_dtype=autocast_dtype,
        grad_scaler=grad_scaler,
        data_parallel=dp.DataParallel(ranks, [len(e.input_ids) for e in prepared.train], config.seed) if ranks.active else None,
    )  # fmt: skip
    every_seconds = (
        config.save_every_minutes * 60 if config.save_every_minutes else the_plan.checkpoint_every_seconds
    )
    best = BestTracker(patience=config.early_stopping_patience, keep_best=config.keep_best)
    if latest is not None and BEST_ADAPTER in latest.files:
        best.restore(store.read(latest, BEST_ADAPTER))
    checkpointer = Checkpointer(
        store, model, optimizer, scheduler, extra_files=best.checkpoint_files,
        metadata={
            **checkpoint_metadata(identity, the_plan, store, run_config), "world_size": ranks.world_size,
            "loftq_base_sha256": base_entry and base_entry["sha256"],
        },
        every_seconds=every_seconds, every_steps=config.save_every_steps, grad_scaler=grad_scaler,
    )  # fmt: skip
    if ranks.active:
        checkpointer = dp.MainRankCheckpointer(checkpointer, ranks)
    eval_every = config.eval_every or max(1, total_steps // 5)
    log_to = out if ranks.is_main else None  # ranks other than 0 neither log, evaluate nor show progress
    names = parse_report_to(config.report_to) if ranks.is_main else ()
    trackers = Trackers(names, out, out.name, start_step=state.step)
    trackers.log_params({"settings": config.settings(), "plan": the_plan.to_dict(), "model": config.model})
    try:
        train_seconds = probe_train_and_checkpoint(
            runner, state, prepared.train, checkpointer, store,
            lambda: run_steps(task, config, log_to, prepared, runner, checkpointer, state, total_steps, the_plan, eval_every, best, trackers),
        )  # fmt: skip
    finally:
        trackers.close()
    if ranks.is_main and best.apply_best(model):
        # The run's adapter is the best-eval one; the last weights stay in the newest checkpoint.
        log.info("kept the adapter of step %d (eval loss %.4f)", state.best_step, state.best_eval_loss)

    metrics = run_metrics(state, time.time() - started, train_seconds, checkpointer)
    if not ranks.is_main:
        dp.barrier(ranks)  # rank 0 writes the adapter, the record and pushes
        return task.result_type(
            out, out, out / RUN_RECORD, None, metrics, the_plan, latest.step if latest else None
        )
    save_adapter(model, out, model.qlora_lite_initial_adapter)  # PiSSA/OLoRA: as plain LoRA on the base
    tokenizer.save_pretrained(out)
    finish = task.finish(model, tokenizer, prepared, runner, state, out)
    for name in finish.drop_metrics:
        metrics.pop(name, None)
    metrics.update(finish.metrics)
    plot = plot_loss(
        state.history, state.eval_history, out / LOSS_PLOT, title=f"{source.display_name} {task.title}"
    )
    record = build_run_record(
        config=config, model_path=source, plan=the_plan, lora=lora, prepared=prepared, identity=identity,
        total_steps=total_steps, eval_every=eval_every, metrics=metrics, state=state, hardware=hardware,
    )  # fmt: skip
    record.update(finish.record, world_size=ranks.world_size)
    record["data"].update(data.record)  # e.g. a Hub data set's id and the commit the records came from
    record["best"] = {
        "step": state.best_step,
        "eval_loss": state.best_eval_loss,
        "kept": best.best_weights is not None,
    }
    record["stopped_early_at"] = state.stopped_early_at
    record["loftq_base"] = base_entry  # None unless LoftQ rewrote the base: then the adapter's base is here
    record["measured_peak"] = {"bytes": state.measured_peak_bytes, "how": state.measured_peak_how}
    write_json_atomic(out / RUN_RECORD, record)
    log.info("saved the adapter and run record in %s", out)
    if config.push_to_hub:
        from qlora_lite.hub.push import push

        pushed = push(out, config.push_to_hub, private=config.hub_private)
        log.info("pushed to %s", pushed.commit_url)
    dp.barrier(ranks)
    return task.result_type(
        out, out, out / RUN_RECORD, plot, metrics, the_plan, latest.step if latest else None,
        **task.result_fields(out, record),
    )  # fmt: skip


def _own_base(model, tokenizer, lora, out: Path, store, latest, ranks: dp.Ranks, source) -> dict[str, Any]:
    """Save the base LoftQ rewrote (a fresh start; rank 0), or put the saved one into `model` (a resume)."""
    if latest is None:
        entry = None
        if ranks.is_main:
            entry = loftq_base.save(model, tokenizer, out, lora, made_from=model_identity(source))
            loftq_base.copy_to_durable(store, out)
        return dp.from_main(entry, ranks)
    sha256 = latest.metadata.get("loftq_base_sha256")
    entry = dp.from_main(loftq_base.restore(out, store, sha256) if ranks.is_main else None, ranks)
    loftq_base.load_into(model, out / entry["folder"])  # the other ranks read the folder rank 0 verified
    return entry


def run_steps(
    task: Task,
    config: TrainConfig,
    out: Path | None,
    prepared: PreparedData,
    runner: StepRunner,
    checkpointer: Checkpointer,
    state,
    total_steps: int,
    the_plan: Plan,
    eval_every: int,
    best: BestTracker | None = None,
    trackers: Trackers | None = None,
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
    best = best or BestTracker()
    trackers = trackers or Trackers((), out, "run")
    # Log lines (checkpoints saved, evals) print above the bar instead of breaking it. Only the loggers that
    # print (have handlers) are redirected: redirecting both the package logger and the root it propagates to
    # printed every line twice.
    printing = [lg for lg in (logging.getLogger(), logging.getLogger("qlora_lite")) if lg.handlers]
    peak = PeakOfRun(runner.device)
    with logging_redirect_tqdm(loggers=printing):
        try:
            while state.step < total_steps and state.stopped_early_at is None:
                indices = step_examples(
                    state.step, len(prepared.train), the_plan.effective_batch_size, config.seed
                )
                t0 = time.perf_counter()
                with peak.measure(runner, state):
                    loss = runner.run(indices, state)
                seconds = time.perf_counter() - t0
                tokens = sum(len(prepared.train[i].input_ids) for i in indices)
                state.step += 1
                state.examples_seen += len(indices)
                state.tokens_seen += tokens
                throughput.add(tokens)
                row = {
                    "step": state.step, "loss": round(loss, 6), "learning_rate": runner.scheduler.get_last_lr()[0],
                    "examples_seen": state.examples_seen, "tokens_seen": state.tokens_seen,
                    "micro_batch_size": state.micro_batch_size, "seconds": round(seconds, 4),
                }  # fmt: skip
                state.history.append(row)
                if out is not None:
                    append_step_log(out, row)
                    trackers.log_row(row)
                if out is not None and (state.step % eval_every == 0 or state.step == total_steps):
                    entry = task.evaluate(runner, prepared, state)
                    if entry is not None:
                        state.eval_history.append(entry)
                        append_step_log(out, entry)
                        trackers.log_row(entry)
                        if best.update(state, entry["eval_loss"], runner.model):
                            log.info(
                                "early stopping at step %d: eval loss has not improved for %d evaluations "
                                "(best %.4f at step %d)", state.step, state.evals_since_best,
                                state.best_eval_loss, state.best_step,
                            )  # fmt: skip
                # Saves when due, runs the callbacks; interrupted (Ctrl-C, SIGTERM): saves, then stops.
                checkpointer.at_step_end(state, total_steps, config.callbacks)
                bar.set_postfix(
                    loss=f"{loss:.4f}", tok_s=f"{throughput.tokens_per_second:.0f}", refresh=False
                )
                bar.update(1)
        finally:
            bar.close()
            peak.finish(state)
