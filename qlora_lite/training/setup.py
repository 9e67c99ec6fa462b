"""What every trainer (causal LM and classifier) does around its loop: the output folder (locked), the checkpoint
store (always closed), a finished run returned as is, where to resume from, optimizer + schedule + resume, the
probe, interrupts deferred to a step boundary, and the run's metrics."""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_lite.checkpoint.lock import RunLock
from qlora_lite.checkpoint.resume import (
    Checkpointer,
    check_same_parameters,
    check_same_run,
    identity_differences,
    restore,
)
from qlora_lite.checkpoint.store import CheckpointInfo, CheckpointStore, default_durable_root
from qlora_lite.config import TrainConfig
from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import parameter_groups
from qlora_lite.run_files import CHECKPOINTS, LOFTQ_BASE, RUN_CONFIG, RUN_FILES  # noqa: F401 (re-exported)
from qlora_lite.training.batching import fullest_rows
from qlora_lite.training.interrupts import DeferredInterrupts
from qlora_lite.training.loop import LoopState, OutOfMemoryAtMicroBatchOne
from qlora_lite.training.record import RUN_RECORD, rewrite_step_log

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(
    name: str, params: list[torch.nn.Parameter] | list[dict], lr: float, weight_decay: float
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


def prepare_output_dir(config: TrainConfig, task_files: tuple[str, ...] = ()) -> Path:
    """The run folder, created; with `overwrite`, the finished run's files (and the task's) are removed (its
    checkpoints are moved aside, kept, when the store opens)."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a folder for the run")
    if config.overwrite and out.is_dir():
        for name in (*RUN_FILES, *task_files):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / LOFTQ_BASE, ignore_errors=True)  # a LoftQ run's base (model/loftq_base.py)
    out.mkdir(parents=True, exist_ok=True)
    return out


class RunFolder:
    """`with RunFolder(config) as folder:` the run folder, locked against a second process for the whole run;
    the checkpoint store opened through it (`folder.open_store()`) is closed on the way out, whatever happens.
    """

    def __init__(self, config: TrainConfig, *, main: bool = True, task_files: tuple[str, ...] = ()) -> None:
        self.config = config
        self.task_files = task_files
        self.path = Path(config.output_dir).expanduser()
        self.main = main  # False on ranks other than 0 of a distributed run: they write nothing here
        self.store: CheckpointStore | None = None
        self._lock: RunLock | None = None

    def __enter__(self) -> RunFolder:
        if not self.main:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output {self.path} is a file: give a folder for the run")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.path)
        self._lock.acquire()  # before anything in the folder changes
        try:
            prepare_output_dir(self.config, self.task_files)
        except BaseException:
            self._lock.release()
            raise
        return self

    def open_store(self) -> CheckpointStore:
        self.store = open_checkpoint_store(self.config, self.path)
        return self.store

    def __exit__(self, *exc_info) -> None:
        try:
            if self.store is not None:
                self.store.close(timeout=10)  # no copy thread outlives the run (a re-run starts a new one)
        finally:
            if self._lock is not None:
                self._lock.release()


def open_checkpoint_store(config: TrainConfig, out: Path) -> CheckpointStore:
    """Local checkpoints plus the durable place: `hf://user/repo`, a folder, or Drive when mounted.

    With `overwrite`, the checkpoints already there (locally and in the durable place) are moved aside, kept:
    the next resume must not find the old run, and the old run's only surviving copy must not be deleted.
    """
    from qlora_lite.hub.checkpoints import backend_from_spec

    backend = (
        backend_from_spec(config.checkpoint_dir, allow_public=config.public_checkpoints)
        if config.checkpoint_dir
        else None
    )
    if backend is not None:
        if hasattr(backend, "check_visibility") and config.resume != "local":
            backend.check_visibility()  # a public Hub repo or a refused token: said before anything starts
        store = CheckpointStore(out / CHECKPOINTS, backend=backend, keep=config.keep_checkpoints)
    else:
        store = CheckpointStore(
            out / CHECKPOINTS, durable_root=durable_root_for(config, out), keep=config.keep_checkpoints
        )
    if config.overwrite:
        store.archive()
    return store


def resume_point(
    config: TrainConfig,
    store: CheckpointStore,
    identity: dict,
    check: Callable[[CheckpointInfo], None] | None = None,
) -> CheckpointInfo | None:
    """The checkpoint this run continues from (None: a fresh start); sets the run id its checkpoints carry.

    resume="never" first moves the older checkpoints aside (kept): left in place, their higher step numbers
    would shadow the new run's checkpoints and make rotation delete each new one. resume="local" skips the
    durable place's listing (when it cannot be listed and the local copy is wanted on purpose).
    """
    latest = None
    if config.resume == "never":
        store.archive()
    elif not config.overwrite:  # overwrite has moved everything aside already
        latest = store.latest(durable=config.resume != "local")
        if latest is not None and check is not None:
            check(latest)  # the task's own refusals first (a classifier's labels are never forced)
        if latest is not None:
            check_same_run(latest, identity, force=config.resume == "force")
    store.run_id = (latest.run_id if latest is not None else None) or secrets.token_hex(8)
    return latest


def durable_root_for(config: TrainConfig, out: Path) -> Path | None:
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir).expanduser()
    root = default_durable_root(out.resolve().name or "run")
    if root is not None:
        log.info("Google Drive is mounted: checkpoints are copied to %s", root)
    return root


def checkpoint_metadata(identity: dict, the_plan, store: CheckpointStore, run_config: dict) -> dict[str, Any]:
    """What every checkpoint says about its run: enough to check it belongs here and, on a fresh machine
    with only the durable place left, to re-run it (`qlora-lite resume --checkpoint-dir`)."""
    return {
        "identity": identity,
        "plan": the_plan.to_dict(),
        "durable_root": getattr(store.backend, "description", None),
        "run_config": run_config,
    }


def saved_run_config(run_dir: Path, checkpoint_dir: str | None) -> dict:
    """The settings a run started with: its run_config.json, else (a fresh machine) its newest durable
    checkpoint's copy of them."""
    path = run_dir / RUN_CONFIG
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
                raise ValueError("no settings in it")
            return saved
        except (ValueError, OSError) as exc:
            raise UserError(
                f"{path} is unreadable ({exc}): run the same train call again (it resumes from the checkpoints)"
            ) from None
    if not checkpoint_dir:
        raise UserError(
            f"{run_dir} holds no {RUN_CONFIG}: it is not a run folder started by qlora-lite train (on a fresh "
            "machine, add --checkpoint-dir with the run's durable place: its Drive folder or hf://user/repo)"
        )
    from qlora_lite.hub.checkpoints import backend_from_spec

    backend = backend_from_spec(checkpoint_dir)
    with CheckpointStore(
        run_dir / CHECKPOINTS, checkpoint_dir if backend is None else None, backend=backend, background=False
    ) as store:
        latest = store.latest()
    saved = latest.metadata.get("run_config") if latest is not None else None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise UserError(
            f"{checkpoint_dir} holds no checkpoint that records its run's settings: resume with the same "
            "train() call (or `qlora-lite train` flags) instead"
        )
    return saved


def finished_record(out: Path, identity: dict) -> dict | None:
    """The run record of a finished run in `out`; refuse one that belongs to another run."""
    record_path = out / RUN_RECORD
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise UserError(
            f"{record_path} is unreadable ({exc}): move it aside to continue the run from its checkpoints, "
            "or pass --overwrite (overwrite=True) to start afresh"
        ) from None
    if not identity_differences(record.get("identity"), identity):
        return record
    raise UserError(
        f"output folder {out} already holds a different finished run ({RUN_RECORD}): choose another --output, "
        "or pass --overwrite (overwrite=True) to replace it"
    )


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of the run."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return int(config.warmup_ratio * total_steps)


def make_grad_scaler(device: torch.device, compute_dtype: str) -> torch.amp.GradScaler | None:
    """fp16 on CUDA (T4, V100) scales the loss; its state is checkpointed with the rest."""
    return torch.amp.GradScaler("cuda") if device.type == "cuda" and compute_dtype == "fp16" else None


def start_or_restore(
    config: TrainConfig, the_plan, model, total_steps: int, store, latest, out: Path | None, grad_scaler=None
):
    """Optimizer, LR schedule and loop state: fresh, or everything restored from `latest`."""
    from transformers import get_scheduler

    # LoRA+: the B matrices in a group of their own at lora_plus_ratio x the learning rate.
    groups = parameter_groups(model, config.learning_rate, config.lora_plus_ratio)
    optimizer = make_optimizer(the_plan.optimizer, groups, config.learning_rate, config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(config, total_steps),
        num_training_steps=total_steps,
    )
    state = LoopState(micro_batch_size=the_plan.micro_batch_size)
    if latest is not None:
        check_same_parameters(latest, model)
        state = restore(store, latest, model, optimizer, scheduler, grad_scaler)
        state.micro_batch_size = the_plan.micro_batch_size  # the plan may have re-split it on this machine
    if out is not None:  # None on ranks other than 0: they write nothing
        rewrite_step_log(out, state.history, state.eval_history)
    return optimizer, scheduler, state


def probe_train_and_checkpoint(runner, state, examples, checkpointer, store, run_steps) -> float:
    """Probe, run the steps, take the last checkpoint and wait for its durable copy; returns training seconds.

    The probe runs the longest examples as one micro-batch, forward and backward, without an update: an OOM
    shows up (and backs off) before any real step, not hours in when the longest batch comes up. Ctrl-C and
    SIGTERM wait for the end of the step, which is saved (`Checkpointer.at_step_end`); during the probe
    nothing has changed since the last checkpoint, so nothing is saved.
    """
    started = time.perf_counter()
    with DeferredInterrupts() as interrupts:
        try:
            # The fullest micro-batch the data allows: the longest examples, packed rows filled up.
            capacity = getattr(runner.objective, "pack_capacity", None)
            runner.run(fullest_rows(examples, state.micro_batch_size, capacity), state, apply=False)
            interrupts.stop()  # interrupted during the probe: stop without saving
            checkpointer.interrupts = interrupts
            run_steps()
            checkpointer.save(state)
            interrupts.stop()
        except OutOfMemoryAtMicroBatchOne as exc:
            raise UserError(str(exc)) from exc
        finally:
            checkpointer.interrupts = None
    seconds = time.perf_counter() - started
    if not store.flush(timeout=120):
        log.warning(
            "the durable copy of the last checkpoint is not finished: %s",
            store.last_durable_error or "still copying",
        )
    store.close(timeout=5)
    return seconds


def run_metrics(
    state: LoopState, seconds: float, train_seconds: float, checkpointer: Checkpointer
) -> dict[str, Any]:
    final_eval = state.eval_history[-1]["eval_loss"] if state.eval_history else None
    step_seconds = sum(r["seconds"] for r in state.history)
    return {
        "train_loss": state.history[-1]["loss"] if state.history else None,
        "eval_loss": final_eval,
        "eval_perplexity": math.exp(final_eval) if final_eval is not None and final_eval < 50 else None,
        "steps": state.step,
        "examples_seen": state.examples_seen,
        "tokens_seen": state.tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(state.tokens_seen / max(1e-9, step_seconds), 2),
        "checkpoints_saved": checkpointer.saves,
        "checkpoint_seconds": round(checkpointer.seconds_saving, 3),
        "checkpoint_overhead": round(checkpointer.seconds_saving / max(1e-9, train_seconds), 4),
        "oom_backoffs": state.oom_backoffs,
        "final_micro_batch_size": state.micro_batch_size,
    }
