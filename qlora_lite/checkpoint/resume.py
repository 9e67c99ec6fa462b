"""Training state <-> checkpoint files: what a checkpoint holds, when one is taken, and how a run resumes.

A checkpoint is taken between optimizer steps, so the gradient-accumulation position is always 0 and the
data position is the step count (each step's examples are a pure function of seed, step and data size).
Restoring adapter, optimizer, scheduler, RNG and loop state therefore continues the run bit for bit.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from qlora_lite.checkpoint.store import CheckpointInfo, CheckpointStore
from qlora_lite.errors import UserError
from qlora_lite.options import BY_NAME, IDENTITY_SETTINGS, IDENTITY_SETTINGS_IF_SET
from qlora_lite.run_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from qlora_lite.training.loop import LoopState
from qlora_lite.training.record import library_versions

log = logging.getLogger(__name__)

ADAPTER, OPTIMIZER, SCHEDULER, RNG, LOOP, SCALER = (
    "adapter.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.pt",
    "loop.json",
    "grad_scaler.pt",  # fp16 only (T4, V100): the loss scale and its growth tracker
)
# The settings that define a run (declared `resume="match"`): a checkpoint made with other values belongs
# to another run.


# What names the base model across machines: its Hub id (another model is another run, even at an equal
# commit), its revision (the Hub commit sha, or a hash of a local folder's files) and a hash of its config.
# The path is left out: the same model sits at another path on another machine.
MODEL_IDENTITY = ("hub_id", "revision", "config_sha256")


def run_identity(config, base_model: dict, data_fingerprint: str) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (paths may differ between machines)."""
    settings = {name: getattr(config, name) for name in IDENTITY_SETTINGS}
    # Options added later count only when set, so checkpoints made before they existed stay valid.
    settings.update(
        {n: getattr(config, n) for n in IDENTITY_SETTINGS_IF_SET if getattr(config, n) != BY_NAME[n].default}
    )
    return {
        "base_model": {key: base_model.get(key) for key in MODEL_IDENTITY},
        "data_fingerprint": data_fingerprint,
        "settings": settings,
    }


def trainable_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if saved == current else [f"{path}: {_short(saved)} in the checkpoint, {_short(current)} now"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def identity_differences(saved: Any, identity: dict) -> list[str]:
    """'field: A in the checkpoint, B now' for each difference (keys missing on one side count as None)."""
    return _differences(saved if isinstance(saved, dict) else {}, identity)


def check_same_run(info: CheckpointInfo, identity: dict, *, force: bool) -> None:
    """Refuse a checkpoint of another run (other data, model or settings) unless forced."""
    saved = info.metadata.get("identity", {})
    diffs = _differences(saved, identity)
    if not diffs:
        return
    if force:
        log.warning("resuming %s although it differs from this run (forced): %s", info.path, "; ".join(diffs))
        return
    raise UserError(
        f"{info.path} belongs to a different run ({'; '.join(diffs[:3])}): pass overwrite=True (--overwrite) "
        "to start fresh, resume='force' (--resume force) to continue anyway, or choose another output folder"
    )


def check_same_parameters(info: CheckpointInfo, model: torch.nn.Module) -> None:
    """Even a forced resume cannot load LoRA matrices of other names or shapes."""
    saved = info.metadata.get("trainable_parameters", {})
    current = trainable_signature(model)
    if saved != current:
        diffs = _differences(saved, current)
        raise UserError(
            f"{info.path}: its trainable parameters differ from this model's ({len(diffs)} differences, e.g. "
            f"{diffs[0] if diffs else 'none'}): the LoRA rank or target modules changed; use the checkpoint's "
            "settings or pass overwrite=True (--overwrite) to start fresh"
        )


def capture_rng() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def peft_adapter_files(model: torch.nn.Module) -> dict[str, bytes]:
    """The adapter as PEFT itself saves it (adapter_config.json + adapter_model.safetensors, PEFT's key names),
    so a user can load any checkpoint with plain `PeftModel.from_pretrained(base, checkpoint_dir)`.
    `ADAPTER` keeps the full parameter names for an exact restore; the adapter is small next to the optimizer."""
    save = getattr(model, "save_pretrained", None)
    if save is None:  # not a PeftModel (a wrapper): nothing PEFT could load
        return {}
    with tempfile.TemporaryDirectory(prefix="qlora-lite-adapter-") as folder:
        save(folder)
        return {name: (Path(folder) / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


class Checkpointer:
    """Takes checkpoints of a training run on a time (and optionally step) interval."""

    def __init__(
        self,
        store: CheckpointStore,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        metadata: dict[str, Any],
        every_seconds: float,
        every_steps: int | None = None,
        grad_scaler: Any = None,
        extra_files: Callable[[], dict[str, bytes]] | None = None,
    ) -> None:
        self.store, self.model, self.optimizer, self.scheduler = store, model, optimizer, scheduler
        self.grad_scaler = grad_scaler
        self.extra_files = extra_files  # more state to save with each checkpoint (the best adapter so far)
        self.interrupts: Any = None  # a DeferredInterrupts while the loop runs
        self.metadata = metadata
        self.every_seconds, self.every_steps = every_seconds, every_steps
        self.last_save = time.monotonic()
        self.last_step: int | None = None
        self.seconds_saving = 0.0
        self.saves = 0

    def at_step_end(self, state: LoopState, total_steps: int, callbacks: Sequence[Any] = ()) -> None:
        """At a step boundary: save when due and run the callbacks' `on_step_end`. When an interrupt waits
        (Ctrl-C or SIGTERM noted mid-step, or a callback raising KeyboardInterrupt), save this step and stop.
        """
        if state.step < total_steps and self.due(state):
            self.save(state)
        try:
            for callback in callbacks:
                if hasattr(callback, "on_step_end"):
                    callback.on_step_end(state)
        except KeyboardInterrupt:  # raised here, at the boundary: the state is whole
            self._save_before_stopping(state)
            raise
        if self.interrupts is not None and self.interrupts.pending is not None:
            self._save_before_stopping(state)
            self.interrupts.stop()

    def _save_before_stopping(self, state: LoopState) -> None:
        self.save(state)
        log.warning("saved step %d: stopping (run the same call again to continue)", state.step)
        self.store.flush(timeout=60)

    def due(self, state: LoopState) -> bool:
        if self.every_steps and state.step % self.every_steps == 0:
            return True
        return time.monotonic() - self.last_save >= self.every_seconds

    def save(self, state: LoopState) -> CheckpointInfo | None:
        if state.step == self.last_step:
            return None
        started = time.monotonic()
        trainable = {
            n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad
        }
        files = {
            **peft_adapter_files(self.model),
            ADAPTER: save_safetensors(trainable),
            OPTIMIZER: _torch_bytes(self.optimizer.state_dict()),
            SCHEDULER: _torch_bytes(self.scheduler.state_dict()),
            RNG: _torch_bytes(capture_rng()),
            LOOP: json.dumps(asdict(state)).encode(),
            **(self.extra_files() if self.extra_files else {}),
        }
        if self.grad_scaler is not None:
            files[SCALER] = _torch_bytes(self.grad_scaler.state_dict())
        metadata = {
            **self.metadata,
            "step": state.step,
            "examples_seen": state.examples_seen,
            "tokens_seen": state.tokens_seen,
            "accumulation_position": 0,  # saved between optimizer steps, never inside an accumulation cycle
            "trainable_parameters": trainable_signature(self.model),
            "versions": library_versions(),
        }
        info = self.store.save(state.step, files, metadata)
        self.last_save = time.monotonic()
        self.last_step = state.step
        self.seconds_saving += self.last_save - started
        self.saves += 1
        return info


def restore(
    store: CheckpointStore, info: CheckpointInfo, model, optimizer, scheduler, grad_scaler: Any = None
) -> LoopState:
    """Load everything a checkpoint holds into a freshly built model/optimizer/scheduler (and fp16 scaler).

    The loop state is parsed first: a checkpoint that cannot be restored changes nothing and is kept.
    """
    params = dict(model.named_parameters())
    try:
        loop = json.loads(store.read(info, LOOP))
        state = LoopState(**loop)
        adapter = load_safetensors(store.read(info, ADAPTER))
        optimizer_state = _torch_load(store.read(info, OPTIMIZER))
        scheduler_state = _torch_load(store.read(info, SCHEDULER))
        rng_state = _torch_load(store.read(info, RNG))
        scaler_state = _torch_load(store.read(info, SCALER)) if SCALER in info.files else None
        with torch.no_grad():
            for name, tensor in adapter.items():
                params[name].copy_(tensor.to(params[name].device))
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        restore_rng(rng_state)
        if grad_scaler is not None and scaler_state is not None:
            grad_scaler.load_state_dict(scaler_state)
    except (KeyError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as exc:
        raise UserError(
            f"{info.path} could not be restored ({type(exc).__name__}: {str(exc)[:200]}); it is kept: move that "
            "folder aside to resume from an older checkpoint, or pass resume='never' to start afresh"
        ) from exc
    log.info("resuming from %s (step %d, %s)", info.path, info.step, info.location)
    return state
