"""What every trainer (causal LM and classifier) does around its loop: the output folder, the checkpoint
store, a finished run returned as is, optimizer + schedule + resume, the probe, and the run's metrics."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_lite.checkpoint.resume import Checkpointer, check_same_parameters, restore
from qlora_lite.checkpoint.store import CheckpointStore, default_durable_root
from qlora_lite.config import TrainConfig
from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import parameter_groups
from qlora_lite.run_files import CHECKPOINTS, RUN_FILES  # noqa: F401 (re-exported)
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
    """The run folder, created; with `overwrite`, emptied of a previous run (its files and checkpoints)."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a folder for the run")
    if config.overwrite and out.is_dir():
        for name in (*RUN_FILES, *task_files):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_checkpoint_store(config: TrainConfig, out: Path) -> CheckpointStore:
    """Local checkpoints plus the durable place: `hf://user/repo`, a folder, or Drive when mounted.

    With `overwrite`, the run's durable checkpoints go too, or the next resume would find the old run there.
    """
    from qlora_lite.hub.checkpoints import backend_from_spec

    backend = backend_from_spec(config.checkpoint_dir) if config.checkpoint_dir else None
    if backend is not None:
        store = CheckpointStore(out / CHECKPOINTS, backend=backend, keep=config.keep_checkpoints)
    else:
        store = CheckpointStore(
            out / CHECKPOINTS, durable_root=durable_root_for(config, out), keep=config.keep_checkpoints
        )
    if config.overwrite and store.backend is not None:
        for name in store.backend.list():
            store.backend.delete(name)
    return store


def durable_root_for(config: TrainConfig, out: Path) -> Path | None:
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir).expanduser()
    root = default_durable_root(out.resolve().name or "run")
    if root is not None:
        log.info("Google Drive is mounted: checkpoints are copied to %s", root)
    return root


def finished_record(out: Path, identity: dict) -> dict | None:
    """The run record of a finished run in `out`; refuse one that belongs to another run."""
    record_path = out / RUN_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("identity") == identity:
        return record
    raise UserError(
        f"output folder {out} already holds a different finished run ({RUN_RECORD}): choose another --output, "
        "or pass --overwrite (overwrite=True) to replace it"
    )


def start_or_restore(config: TrainConfig, the_plan, model, total_steps: int, store, latest, out: Path | None):
    """Optimizer, LR schedule and loop state: fresh, or everything restored from `latest`."""
    from transformers import get_scheduler

    # LoRA+: the B matrices in a group of their own at lora_plus_ratio x the learning rate.
    groups = parameter_groups(model, config.learning_rate, config.lora_plus_ratio)
    optimizer = make_optimizer(the_plan.optimizer, groups, config.learning_rate, config.weight_decay)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    state = LoopState(micro_batch_size=the_plan.micro_batch_size)
    if latest is not None:
        check_same_parameters(latest, model)
        state = restore(store, latest, model, optimizer, scheduler)
        state.micro_batch_size = the_plan.micro_batch_size  # the plan may have re-split it on this machine
    if out is not None:  # None on ranks other than 0: they write nothing
        rewrite_step_log(out, state.history, state.eval_history)
    return optimizer, scheduler, state


def probe_train_and_checkpoint(runner, state, examples, checkpointer, store, run_steps) -> float:
    """Probe, run the steps, take the last checkpoint and wait for its durable copy; returns training seconds.

    The probe runs the longest examples as one micro-batch, forward and backward, without an update: an OOM
    shows up (and backs off) before any real step, not hours in when the longest batch comes up. Ctrl-C saves
    a checkpoint before it stops the run.
    """
    started = time.perf_counter()
    try:
        longest = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        runner.run(longest[: state.micro_batch_size], state, apply=False)
        run_steps()
        checkpointer.save(state)
    except OutOfMemoryAtMicroBatchOne as exc:
        raise UserError(str(exc)) from exc
    except KeyboardInterrupt:
        log.warning("interrupted: saving a checkpoint at step %d before stopping", state.step)
        checkpointer.save(state)
        store.flush(timeout=60)
        raise
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
