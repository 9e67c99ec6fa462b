"""Recipes, tracking and early stopping through real training runs on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_lite
from qlora_lite.cli.main import main

WORKER = str(Path(__file__).with_name("train_worker.py"))
ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(24)]
# Held-out answers that contradict the training ones: the eval loss rises as training goes on.
CONTRARY = [{"instruction": f"Say the number {i}", "output": "No."} for i in range(6)]
FAST = dict(effective_batch_size=4, micro_batch_size=2, lora_r=4, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("recipe-data")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "contrary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONTRARY))
    return {"train": str(folder / "train.jsonl"), "contrary": str(folder / "contrary.jsonl")}


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_recipe_with_hugging_face_names_trains_the_same_adapter_as_the_flags(tiny_model, files, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model}\ndataset: {files['train']}\noutput_dir: {tmp_path / 'from-recipe'}\n"
        "max_steps: 3\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nlearning_rate: 1.0e-3\n"
        "lr_scheduler_type: linear\nwarmup_steps: 1\nr: 4\nlora_alpha: 8\nseed: 5\nmax_length: 64\n"
        "save_total_limit: 1\n"
    )
    assert main(["train", "--config", str(recipe), "--no-progress"]) == 0
    flags = [
        "train", "--model", tiny_model, "--data", files["train"], "--output", str(tmp_path / "from-flags"),
        "--max-steps", "3", "--micro-batch-size", "2", "--gradient-accumulation-steps", "2",
        "--learning-rate", "1e-3", "--lr-scheduler", "linear", "--warmup-steps", "1", "--lora-r", "4",
        "--lora-alpha", "8", "--seed", "5", "--max-seq-length", "64", "--keep-checkpoints", "1", "--no-progress",
    ]  # fmt: skip
    assert main(flags) == 0
    assert same_adapter(tmp_path / "from-recipe", tmp_path / "from-flags")
    # A flag overrides the recipe: another learning rate gives another adapter.
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "lr"), "--learning-rate", "5e-3",
                 "--no-progress"]) == 0  # fmt: skip
    assert not same_adapter(tmp_path / "from-recipe", tmp_path / "lr")
    saved = json.loads((tmp_path / "lr" / "run_config.json").read_text())["settings"]
    assert (saved["learning_rate"], saved["warmup_steps"], saved["micro_batch_size"]) == (5e-3, 1, 2)


def test_recipe_mistakes_exit_2_with_one_line(tiny_model, files, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        f"model: {tiny_model}\ndata: {files['train']}\noutput_dir: {tmp_path}/x\nnum_train_epoch: 2\n"
    )
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {recipe} line 4: unknown key 'num_train_epoch' (did you mean 'num_train_epochs'?)"
    recipe.write_text(f"model: {tiny_model}\ndata: {files['train']}\nmax_steps: 0\n")
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {recipe}: max_steps must be >= 1 (got 0)"
    recipe.write_text(f"data: {files['train']}\n")
    assert main(["train", "--config", str(recipe)]) == 2
    assert "--model is required (or `model:` in the --config recipe)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tensorboard_receives_every_step_and_eval(tiny_model, files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = qlora_lite.train(
        tiny_model, files["train"], str(out), max_steps=4, eval_every=2, report_to="tensorboard", **FAST
    )
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert losses == [(r["step"], round(r["loss"], 5)) for r in steps if "loss" in r]
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert "run/parameters/text_summary" in acc.Tags()["tensors"]
    record = json.loads((out / "run_record.json").read_text())
    measured = record["measured_peak"]["bytes"]
    assert measured > 0 and result.plan.peak_memory_bytes > 0
    from qlora_lite.hub.card import render_model_card

    card = str(render_model_card(out, "me/run"))
    off = 100 * (result.plan.peak_memory_bytes - measured) / measured
    assert f"(prediction {off:+.0f}%)" in card


def early_settings(files, **extra) -> dict:
    settings = dict(
        FAST, max_steps=12, eval_every=1, eval_data=files["contrary"], early_stopping_patience=2,
        keep_best=True, lr_scheduler="constant", warmup_ratio=0.0, learning_rate=5e-3, save_every_steps=2,
        keep_checkpoints=5,
        packing=False,  # the resume test kills at a counted forward call: one micro-batch per forward
        **extra,
    )  # fmt: skip
    return settings


def test_early_stopping_stops_after_patience_and_keeps_the_best_adapter(tiny_model, files, tmp_path):
    out = tmp_path / "early"
    result = qlora_lite.train(tiny_model, files["train"], str(out), **early_settings(files))
    record = json.loads((out / "run_record.json").read_text())
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: (e[1], e[0]))
    assert record["best"] == {"step": best_step, "eval_loss": best_loss, "kept": True}
    assert record["stopped_early_at"] == best_step + 2 == result.metrics["steps"] < 12
    # The run's adapter is the best step's: the same as a run that simply ends there (constant LR).
    ref = tmp_path / "ref"
    qlora_lite.train(
        tiny_model, files["train"], str(ref),
        **{**early_settings(files), "max_steps": best_step, "early_stopping_patience": None, "keep_best": False},
    )  # fmt: skip
    assert same_adapter(out, ref)
    # ... and the last weights stay in the newest checkpoint.
    newest = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    assert int(newest.name.split("-")[1]) == record["stopped_early_at"]


def test_resume_mid_way_with_patience_is_exact(tiny_model, files, tmp_path):
    def run(out, **kill):
        job = {"model": tiny_model, "data": files["train"], "out": str(out),
               "settings": early_settings(files), **kill}  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, WORKER, json.dumps(job)], capture_output=True, text=True,
                              env=env, timeout=600)  # fmt: skip

    whole = tmp_path / "whole"
    assert run(whole).returncode == 0
    a = json.loads((whole / "run_record.json").read_text())
    stop = a["stopped_early_at"]
    assert stop is not None and stop >= 3
    killed = tmp_path / "killed"
    # Forward 1 is the probe; step k runs forwards 2k and 2k+1: die inside the stopping step, after the last
    # checkpoint (every 2 steps) before it.
    assert run(killed, kill_at_forward=2 * stop).returncode == -9
    again = run(killed)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_from_step"] == (stop - 1) // 2 * 2
    b = json.loads((killed / "run_record.json").read_text())
    assert (a["best"], a["stopped_early_at"]) == (b["best"], b["stopped_early_at"])
    assert same_adapter(whole, killed)


def test_each_log_line_is_printed_once_under_the_progress_bar(tiny_model, files, tmp_path):
    out = tmp_path / "logs"
    cmd = [sys.executable, "-m", "qlora_lite", "train", "--model", tiny_model, "--data", files["train"],
           "--output", str(out), "--max-steps", "2", "--save-every-steps", "1", "--lora-r", "4",
           "--micro-batch-size", "2", "--effective-batch-size", "4"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = [line for line in done.stderr.splitlines() if "checkpoint-000001 (" in line and "saved" in line]
    assert len(saved) == 1, done.stderr[-3000:]
