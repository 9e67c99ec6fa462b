"""The two-real-adapter demo on SmolLM2-135M (slow: trains a second adapter for minutes on CPU)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_two_adapters_on_one_base_each_win_their_task_and_route(tmp_path):
    from qlora_lite.demo.adapters import run_adapters_demo

    summary = run_adapters_demo(str(tmp_path / "demo"), n_eval=8, progress=False)
    for name in ("orders", "dates"):
        # Each adapter, through the one loaded base and in batches shared with the other task's rows (each row
        # its own adapter), beats the base on its own task.
        own = summary["accuracy_own_adapter_in_mixed_batches"][name]
        assert own >= summary["accuracy_base"][name] + 50
    assert summary["router"]["held_out_accuracy"] >= 0.9
    assert summary["timing"]["reload_over_switch"] > 2
    assert (tmp_path / "demo" / "router.json").is_file()
