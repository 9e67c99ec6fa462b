"""Ctrl-C and SIGTERM at every point of an optimizer step: the run finishes the step, saves it and stops; the
checkpoint equals the uninterrupted run's at that step, so it resumes exactly. During the probe nothing is
saved. fp16's GradScaler state is checkpointed and restored."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch.optim.optimizer import register_optimizer_step_post_hook

import qlora_lite
from qlora_lite.checkpoint.manifest import CheckpointInfo, verify_checkpoint

ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(24)]
# Periodic saves at 4 only: an interrupt in step 3 is saved as step 3 or, wrongly, over step 2.
SETTINGS = dict(
    max_steps=6, effective_batch_size=4, micro_batch_size=2, lora_r=4, seed=3, progress=False,
    lora_dropout=0.1, save_every_steps=4, eval_every=3,
    packing=False,  # the forward counts below are one padded micro-batch of 2 examples per call
)  # fmt: skip
STEP = 3


class Terminated(BaseException):
    """What SIGTERM does to a process that does not handle it: stop on the spot (raised, to keep pytest)."""


class SignalAt:
    """Sends `signum` to this process once, at `point` of optimizer step STEP (the probe: before step 1)."""

    def __init__(self, signum: int, point: str) -> None:
        self.signum, self.point = signum, point
        self.forwards = self.backwards = self.optimizer_steps = 0
        self.fired = False
        self.handles: list = []

    def fire(self) -> None:
        if not self.fired:
            self.fired = True
            os.kill(os.getpid(), self.signum)

    def on_model_ready(self, model) -> None:
        layer = model.get_base_model().model.layers[0]
        self.handles.append(layer.register_forward_pre_hook(self.forward))
        self.handles.append(layer.register_full_backward_hook(self.backward))
        self.handles.append(register_optimizer_step_post_hook(self.optimizer_step))

    # Forward calls in training mode: 1 is the probe; step k runs 2k and 2k+1 (two micro-batches).
    def forward(self, module, args) -> None:
        if not module.training:
            # the periodic evaluation, after training started (not the eval-mode fast-path check before it)
            if self.point == "eval" and self.forwards > 0:
                self.fire()
            return
        self.forwards += 1
        wanted = {"probe": 1, "first-micro-batch": 2 * STEP, "second-micro-batch": 2 * STEP + 1}
        if wanted.get(self.point) == self.forwards:
            self.fire()

    def backward(self, module, grad_input, grad_output) -> None:
        self.backwards += 1
        if self.point == "backward" and self.backwards == 2 * STEP:
            self.fire()

    def optimizer_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_steps += 1  # after optimizer.step(), before the step counter moves
        if self.point == "after-optimizer-step" and self.optimizer_steps == STEP:
            self.fire()

    def emit(self, record: logging.LogRecord) -> None:  # as a log handler: during the save of step 4
        if (
            self.point == "save"
            and "saved" in record.getMessage()
            and "checkpoint-000004" in record.getMessage()
        ):
            self.fire()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def checkpoint_state(info: CheckpointInfo) -> dict:
    """What a checkpoint restores, with the step log's timings left out."""

    def torch_file(name: str):
        return torch.load(io.BytesIO((info.path / name).read_bytes()), weights_only=True)

    loop = json.loads((info.path / "loop.json").read_text())
    for row in loop["history"]:
        row.pop("seconds")
    return {
        "adapter": load_safetensors((info.path / "adapter.safetensors").read_bytes()),
        "optimizer": torch_file("optimizer.pt"),
        "scheduler": torch_file("scheduler.pt"),
        "rng": torch_file("rng.pt"),
        "loop": loop,
    }


def assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint at every step to compare against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    qlora_lite.train(tiny_model, ROWS, out, **{**SETTINGS, "save_every_steps": 1, "keep_checkpoints": 10})
    return out


@pytest.fixture
def sigterm_stops_on_the_spot():
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


POINTS = [
    "probe",
    "first-micro-batch",
    "second-micro-batch",
    "backward",
    "after-optimizer-step",
    "eval",
    "save",
]
# Every point with both signals (about a second each).
CASES = [
    pytest.param(point, name, id=f"{point}-{name}") for point in POINTS for name in ("SIGINT", "SIGTERM")
]


@pytest.mark.parametrize(("point", "signame"), CASES)
def test_an_interrupt_at_any_point_of_a_step_saves_that_step_exactly(
    tiny_model, tmp_path, reference, sigterm_stops_on_the_spot, point, signame, caplog
):
    signum = getattr(signal, signame)
    sender = SignalAt(signum, point)
    logger = logging.getLogger("qlora_lite")
    # The "save" point listens for the INFO line "saved ...".
    caplog.set_level(logging.INFO, logger="qlora_lite")
    handler = logging.Handler()
    handler.emit = sender.emit
    logger.addHandler(handler)
    out = tmp_path / "run"
    stopped = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    try:
        with pytest.raises(stopped) as info:
            qlora_lite.train(tiny_model, ROWS, out, callbacks=[sender], **SETTINGS)
    finally:
        logger.removeHandler(handler)
        sender.close()
    assert sender.fired
    if stopped is SystemExit:
        assert info.value.code == 128 + signal.SIGTERM
    folder = out / "checkpoints"
    names = (
        sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))
        if folder.is_dir()
        else []
    )
    if point == "probe":
        assert names == []  # nothing had changed: nothing is saved
        return
    # The step in progress when the signal came, finished; during the save of step 4 that step is whole and
    # being saved: the run stops there (nothing is saved twice, no further step is run).
    expected = 4 if point == "save" else STEP
    assert names[-1] == f"checkpoint-{expected:06d}"
    for name in names:  # every checkpoint left equals the uninterrupted run's at that step
        got = verify_checkpoint(out / "checkpoints" / name)
        want = verify_checkpoint(reference / "checkpoints" / name)
        assert isinstance(got, CheckpointInfo) and isinstance(want, CheckpointInfo)
        assert_equal(checkpoint_state(got), checkpoint_state(want), name)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path, reference):
    sender = SignalAt(signal.SIGINT, "after-optimizer-step")
    out = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            qlora_lite.train(tiny_model, ROWS, out, callbacks=[sender], **SETTINGS)
    finally:
        sender.close()
    result = qlora_lite.train(tiny_model, ROWS, out, **SETTINGS)
    assert result.resumed_from_step == STEP
    want = load_safetensors((reference / "adapter_model.safetensors").read_bytes())
    got = load_safetensors((out / "adapter_model.safetensors").read_bytes())
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path):
    from qlora_lite.checkpoint.resume import Checkpointer, restore
    from qlora_lite.checkpoint.store import CheckpointStore
    from qlora_lite.training.loop import LoopState

    def parts(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        return model, optimizer, scheduler, scaler

    model, optimizer, scheduler, scaler = parts(0)
    scaler.scale(torch.ones(1))
    scaler.update(new_scale=1024.0)  # as after overflows on a T4
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, model, optimizer, scheduler, {}, every_seconds=1e9, grad_scaler=scaler)
    info = checkpointer.save(LoopState(step=7))
    assert "grad_scaler.pt" in info.files
    model2, optimizer2, scheduler2, scaler2 = parts(1)
    assert scaler2.get_scale() != 1024.0
    state = restore(store, store.latest(), model2, optimizer2, scheduler2, scaler2)
    assert state.step == 7 and scaler2.get_scale() == 1024.0
    assert scaler2.state_dict() == scaler.state_dict()
