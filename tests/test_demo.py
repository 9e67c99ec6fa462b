"""The built-in demo on the real SmolLM2-135M-Instruct (about 4 minutes on 2 CPU cores): measured, not assumed."""

from __future__ import annotations

import json

import pytest

from qlora_lite.demo.run import run_demo
from qlora_lite.demo.task import is_correct, make_dataset


def test_demo_task_is_held_out_and_checked_exactly():
    train, held_out = make_dataset(n_train=480, n_eval=32)
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    row = held_out[0]
    expected = json.loads(row["output"])
    assert is_correct(json.dumps(expected, indent=2), row)  # spacing and key order do not matter
    assert not is_correct(json.dumps({**expected, "quantity": expected["quantity"] + 1}), row)
    assert not is_correct("Sure! " + row["output"], row)


def test_demo_gains_at_least_30_points(tmp_path):
    pytest.importorskip("gguf")
    summary = run_demo(str(tmp_path / "demo"), progress=False)
    assert summary["accuracy_after"] - summary["accuracy_before"] >= 30, summary
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "demo_results.json").is_file()
