"""Never lose work: a run killed with SIGKILL and re-run ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from models_util import write_jsonl
from safetensors.torch import load_file

from qlora_lite.checkpoint.store import CheckpointStore

WORKER = str(Path(__file__).with_name("train_worker.py"))
ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(48)]
# 43 training examples after the eval split -> 11 steps per epoch at effective batch 4; 24 steps = 2+ epochs.
SETTINGS = dict(
    max_steps=24,
    effective_batch_size=4,
    micro_batch_size=2,
    lora_r=4,
    seed=3,
    progress=False,
    lora_dropout=0.1,
    packing=False,  # the kill points below count one padded micro-batch of 2 examples per forward call
)


def run_worker(tiny_model, data, out, settings, **kill) -> subprocess.CompletedProcess:
    job = {"model": tiny_model, "data": data, "out": str(out), "settings": settings, **kill}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, WORKER, json.dumps(job)], capture_output=True, text=True, env=env, timeout=600
    )


def finished(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_run(out: Path, reference: Path) -> None:
    got, want = losses(out), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-5, f"step {step}: loss {a} vs {b}"
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(autouse=True)
def one_thread_like_the_workers():
    """In-process runs use one thread, as the worker processes do (OMP_NUM_THREADS=1): a matmul's sum is split
    over threads, so results are bit-equal only at one thread count (the chunked loss's vocabulary-long
    reduction shows it first). Resume itself is exact; another thread count is another arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data"), ROWS)


@pytest.fixture(scope="module")
def reference(tiny_model, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = finished(run_worker(tiny_model, data_file, out, SETTINGS))
    assert result["metrics"]["steps"] == 24 and result["resumed_from_step"] is None
    return out


# Forward calls: 1 is the probe; optimizer step k (1-based) runs calls 2k and 2k+1 (two micro-batches).
@pytest.mark.parametrize(
    ("kill_at_forward", "save_every_steps", "resumes_from"),
    [
        (2 * 7, 3, 6),  # mid-epoch, at the first micro-batch of step 7
        (2 * 5 + 1, 2, 4),  # inside a gradient-accumulation cycle: the second micro-batch of step 5
        pytest.param(  # across the epoch boundary (11 steps per epoch): checkpoint in epoch 1, kill in epoch 2
            2 * 14,
            5,
            10,
            marks=pytest.mark.slow,  # by default the random-kills run resumes in epoch 1 and crosses it
        ),
    ],
    ids=["mid-epoch", "inside-accumulation", "across-epochs"],
)
def test_killed_and_rerun_matches_the_uninterrupted_run(
    tiny_model, data_file, reference, tmp_path, kill_at_forward, save_every_steps, resumes_from
):
    out = tmp_path / "run"
    settings = {**SETTINGS, "save_every_steps": save_every_steps}
    killed = run_worker(tiny_model, data_file, out, settings, kill_at_forward=kill_at_forward)
    assert killed.returncode == -9
    assert CheckpointStore(out / "checkpoints").latest().step == resumes_from
    result = finished(run_worker(tiny_model, data_file, out, settings))
    assert result["resumed_from_step"] == resumes_from
    expected = json.loads((reference / "run_record.json").read_text())["metrics"]
    assert result["metrics"]["steps"] == 24
    assert (
        result["metrics"]["examples_seen"] == expected["examples_seen"] == 43 + 43 + 8
    )  # 2 epochs + 2 steps
    assert_same_run(out, reference)


# Twenty kills take two minutes: four (about 30 s) by default, all twenty in the slow tier.
@pytest.mark.parametrize(
    "wanted_kills", [4, pytest.param(20, marks=pytest.mark.slow)], ids=lambda n: f"{n}-kills"
)
def test_random_kills_while_saving_and_copying(tiny_model, data_file, reference, tmp_path, wanted_kills):
    """Checkpoints every step with a durable copy, so kills land inside saves and copies too."""
    out, durable = tmp_path / "run", tmp_path / "drive"
    settings = {**SETTINGS, "save_every_steps": 1, "checkpoint_dir": str(durable)}
    rng = random.Random(20261130)  # the 4 kills are the first 4 of the 20
    last_step, kills, completions = 0, 0, 0
    while kills < wanted_kills:
        already_done = (out / "run_record.json").exists()  # killed after finishing, before exiting
        proc = run_worker(tiny_model, data_file, out, settings, kill_after_seconds=rng.uniform(0.0, 0.35))
        if proc.returncode == 0:  # the run finished before the timer fired: it must equal the reference
            assert finished(proc)["resumed_from_step"] == (None if already_done else (last_step or None))
            assert_same_run(out, reference)
            completions += 1
            shutil.rmtree(out)
            shutil.rmtree(durable, ignore_errors=True)
            last_step = 0
            continue
        assert proc.returncode == -9, proc.stderr[-3000:]
        kills += 1
        latest = CheckpointStore(out / "checkpoints", durable_root=durable, background=False).latest()
        step = latest.step if latest else 0
        assert step >= last_step, "a kill must never lose a verified checkpoint"
        last_step = step
    already_done = (out / "run_record.json").exists()
    result = finished(run_worker(tiny_model, data_file, out, settings))
    assert result["resumed_from_step"] == (None if already_done else (last_step or None))
    assert_same_run(out, reference)


def test_overwrite_replaces_the_durable_checkpoints_too(tiny_model, data_file, tmp_path):
    out, durable = tmp_path / "run", tmp_path / "drive"
    settings = {**SETTINGS, "max_steps": 4, "save_every_steps": 2, "checkpoint_dir": str(durable)}
    finished(run_worker(tiny_model, data_file, out, settings))
    assert sorted(p.name for p in durable.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-000002",
        "checkpoint-000004",
    ]
    other = {**settings, "learning_rate": 1e-3, "max_steps": 3, "save_every_steps": 3, "overwrite": True}
    result = finished(run_worker(tiny_model, data_file, out, other))
    assert result["resumed_from_step"] is None and result["metrics"]["steps"] == 3
    assert sorted(p.name for p in durable.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-000003"
    ]


def test_a_checkpoint_of_another_run_is_refused_and_kept(tiny_model, data_file, tmp_path):
    out = tmp_path / "run"
    settings = {**SETTINGS, "save_every_steps": 2}
    assert run_worker(tiny_model, data_file, out, settings, kill_at_forward=2 * 5).returncode == -9
    saved = sorted((out / "checkpoints").iterdir())
    changed = run_worker(tiny_model, data_file, out, {**settings, "learning_rate": 5e-4})
    assert changed.returncode == 1
    assert "belongs to a different run" in changed.stderr and "learning_rate" in changed.stderr
    assert sorted((out / "checkpoints").iterdir()) == saved  # nothing saved was lost
    forced = finished(
        run_worker(tiny_model, data_file, out, {**settings, "learning_rate": 5e-4, "resume": "force"})
    )
    assert forced["resumed_from_step"] == 4


def test_cli_resume_and_runs(tiny_model, data_file, reference, tmp_path, capsys):
    from qlora_lite.cli.main import main

    out = tmp_path / "runs" / "killed"
    settings = {**SETTINGS, "save_every_steps": 3}
    assert run_worker(tiny_model, data_file, out, settings, kill_at_forward=2 * 8).returncode == -9
    assert main(["runs", str(tmp_path / "runs")]) == 0
    listing = capsys.readouterr().out
    assert "killed" in listing and "6" in listing
    assert main(["resume", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resumed_from_step"] == 6 and printed["steps"] == 24
    assert_same_run(out, reference)
    assert main(["resume", str(tmp_path)]) == 2
    assert "run_config.json" in capsys.readouterr().err


class Unmount(logging.Handler):
    """Makes the durable folder vanish after one step and come back a few steps later (Drive dropping out).

    It stays gone until the background copier has reported a failed copy (a readiness check, not a sleep).
    """

    def __init__(self, mount: Path, gone_at: int, back_at: int | None) -> None:
        super().__init__()
        self.mount, self.hidden = mount, mount.with_name(mount.name + "-away")
        self.gone_at, self.back_at = gone_at, back_at
        self.copy_failed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "could not copy" in record.getMessage():
            self.copy_failed.set()

    def on_step_end(self, state) -> None:
        if state.step == self.gone_at:
            self.mount.rename(self.hidden)
        if state.step == self.gone_at + 2:
            assert self.copy_failed.wait(timeout=30), "the durable copy never noticed the missing folder"
        if state.step == self.back_at:
            self.hidden.rename(self.mount)


@pytest.mark.parametrize("comes_back", [True, False], ids=["drive-returns", "drive-stays-gone"])
def test_a_vanishing_durable_folder_never_stops_training(tiny_model, data_file, tmp_path, caplog, comes_back):
    import qlora_lite

    mount = tmp_path / "drive"
    mount.mkdir()
    durable = mount / "MyDrive" / "run"
    unmount = Unmount(mount, gone_at=4, back_at=10 if comes_back else None)
    settings = {**SETTINGS, "max_steps": 14, "save_every_steps": 2, "checkpoint_dir": str(durable)}
    logging.getLogger("qlora_lite").addHandler(unmount)
    try:
        with caplog.at_level(logging.WARNING, logger="qlora_lite"):
            result = qlora_lite.train(
                tiny_model, data_file, tmp_path / "run", callbacks=[unmount], **settings
            )
    finally:
        logging.getLogger("qlora_lite").removeHandler(unmount)
    assert result.metrics["steps"] == 14
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("qlora_lite")]
    failures = [m for m in messages if "could not copy" in m]
    assert len(failures) == 1, messages  # reported once, not at every retry
    assert "Training goes on" in failures[0]
    assert any("works again" in m for m in messages) == comes_back
    local = sorted(
        p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("checkpoint-")
    )
    assert local == ["checkpoint-000012", "checkpoint-000014"]
    if comes_back:
        # Copies resumed once the folder was back: the newest checkpoint reached the durable place.
        assert (durable / "checkpoint-000014" / "manifest.json").is_file()
    else:
        # Nothing was written into the bare mount point on the local disk; the older durable copies are intact.
        assert not mount.exists()
        kept = sorted(
            p.name for p in (unmount.hidden / "MyDrive" / "run").iterdir() if p.name.startswith("checkpoint")
        )
        assert kept and kept[-1] <= "checkpoint-000004"


def test_a_truncated_newest_checkpoint_is_skipped_and_the_older_one_resumes(
    tiny_model, data_file, reference, tmp_path, caplog
):
    out = tmp_path / "run"
    settings = {**SETTINGS, "save_every_steps": 3}
    assert run_worker(tiny_model, data_file, out, settings, kill_at_forward=2 * 8).returncode == -9
    newest = out / "checkpoints" / "checkpoint-000006"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a copy cut short
    result = finished(run_worker(tiny_model, data_file, out, settings))
    assert result["resumed_from_step"] == 3
    assert_same_run(out, reference)


def test_resume_on_a_smaller_machine_keeps_the_plan_and_re_splits_the_micro_batch(
    tiny_model, data_file, tmp_path
):
    """Only micro-batch/accumulation may change; effective batch, sequence length and the rest stay."""
    import qlora_lite
    from qlora_lite.planner.planning import plan

    settings = {
        **SETTINGS,
        "micro_batch_size": 4,
        "effective_batch_size": 8,
        "lora_dropout": 0.0,
        "max_steps": 8,
    }
    uninterrupted = qlora_lite.train(tiny_model, data_file, tmp_path / "reference", **settings)
    out = tmp_path / "run"
    assert (
        run_worker(
            tiny_model, data_file, out, {**settings, "save_every_steps": 3}, kill_at_forward=8
        ).returncode
        == -9
    )

    saved = uninterrupted.plan
    knobs = dict(max_seq_length=saved.max_seq_length, gradient_checkpointing=saved.gradient_checkpointing,
                 effective_batch_size=8, hardware="cpu")  # fmt: skip
    at4 = plan(tiny_model, micro_batch_size=4, **knobs).peak_memory_bytes
    at1 = plan(tiny_model, micro_batch_size=1, **knobs).peak_memory_bytes
    budget = int((at1 + (at4 - at1) * 0.3) / 0.9)  # micro-batch 1 fits under the headroom, 4 does not
    # No micro_batch_size here: the resumed run takes the saved plan and re-splits only if it must.
    resumed_settings = {k: v for k, v in settings.items() if k != "micro_batch_size"}
    resumed = qlora_lite.train(
        tiny_model, data_file, out, max_memory=budget, save_every_steps=3, **resumed_settings
    )
    assert resumed.resumed_from_step == 3
    assert resumed.plan.micro_batch_size < 4
    assert resumed.plan.effective_batch_size == 8
    assert resumed.plan.max_seq_length == saved.max_seq_length
    assert resumed.metrics["examples_seen"] == uninterrupted.metrics["examples_seen"]
    a = load_file(uninterrupted.output_dir / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_killed_packed_run_resumes_exactly(tiny_model, data_file, tmp_path):
    """Packed rows (3 per step here, one per micro-batch): killed inside a step, re-run, same as uninterrupted."""
    settings = {**SETTINGS, "packing": True, "max_seq_length": 32, "micro_batch_size": 1, "max_steps": 8}
    reference = tmp_path / "reference"
    finished(run_worker(tiny_model, data_file, reference, settings))
    out = tmp_path / "run"
    settings = {**settings, "save_every_steps": 3}
    killed = run_worker(tiny_model, data_file, out, settings, kill_at_forward=14)
    assert killed.returncode == -9
    step = CheckpointStore(out / "checkpoints").latest().step
    assert step in (3, 6)
    result = finished(run_worker(tiny_model, data_file, out, settings))
    assert result["resumed_from_step"] == step
    assert_same_run(out, reference)
