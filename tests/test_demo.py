"""The built-in demo on the real SmolLM2-135M-Instruct (about 4 minutes on 2 CPU cores): measured, not assumed."""

from __future__ import annotations

import json

import pytest

from qlora_lite.demo.run import format_summary, run_demo
from qlora_lite.demo.task import is_correct, make_dataset


def test_demo_task_is_held_out_and_checked_exactly():
    train, held_out = make_dataset(n_train=480, n_eval=32)
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    row = held_out[0]
    expected = json.loads(row["output"])
    assert is_correct(json.dumps(expected, indent=2), row)  # spacing and key order do not matter
    assert not is_correct(json.dumps({**expected, "quantity": expected["quantity"] + 1}), row)
    assert not is_correct("Sure! " + row["output"], row)


@pytest.mark.slow  # ~5 min on 2 AVX-512 cores, ~10 on AVX2-only ones; the default tier runs the short check below
def test_demo_gains_at_least_30_points(tmp_path):
    pytest.importorskip("gguf")
    summary = run_demo(str(tmp_path / "demo"), progress=False)
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 30, summary
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "demo_results.json").is_file()


def test_demo_path_end_to_end_in_a_few_steps(tmp_path):
    """The demo's whole path (real SmolLM2 in 4-bit, measure before, train, measure after) on a short budget:
    4 steps on 64 orders, 4 held-out orders. Training must lower the loss on the same held-out examples (a run
    that does not learn keeps it level) and the summary must report before and after."""
    pytest.importorskip("gguf")
    summary = run_demo(
        str(tmp_path / "demo"), max_steps=4, n_train=64, n_eval=4, progress=False, sample_generations=0
    )  # the demo measures before/after itself: no extra samples inside train()
    record = json.loads((tmp_path / "demo" / "run_record.json").read_text())
    losses = [row["loss"] for row in record["history"]]
    held_out = [row["eval_loss"] for row in record["eval_history"]]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert len(held_out) >= 2 and held_out[-1] < held_out[0], held_out
    assert summary["train_metrics"]["steps"] == 4 and summary["held_out_examples"] == 4
    assert 0 <= summary["accuracy_before"] <= 100 and 0 <= summary["accuracy_after"] <= 100
    assert len(summary["samples"]) == 3 and all(s["after"] for s in summary["samples"])
    text = format_summary(summary)
    assert "before training:" in text and "after training:" in text
