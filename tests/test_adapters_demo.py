"""The two-real-adapter demo on SmolLM2-135M (slow: trains a second adapter for minutes on CPU)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_two_adapters_on_one_base_each_win_their_task_and_route(tmp_path):
    from qlora_lite.demo.adapters import run_adapters_demo

    summary = run_adapters_demo(str(tmp_path / "demo"), n_eval=8, progress=False)
    for name in ("orders", "dates"):
        # Each adapter through the one loaded base beats the base on its own task, and a mixed batch
        # (each row its own adapter, padded with the other task's rows) scores what it scores alone, give or take
        # one answer (padding shifts float rounding).
        assert summary["accuracy_own_adapter"][name] >= summary["accuracy_base"][name] + 50
        assert abs(summary["accuracy_mixed_batch"][name] - summary["accuracy_own_adapter"][name]) <= 100 / 8
    assert summary["router"]["held_out_accuracy"] >= 0.9
    assert summary["timing"]["reload_over_switch"] > 2
    assert (tmp_path / "demo" / "router.json").is_file()
