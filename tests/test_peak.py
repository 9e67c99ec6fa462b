"""The CPU peak tracker against allocations of known size."""

from __future__ import annotations

import torch

from qlora_lite.planner.peak import live_bytes, track_peak

MIB = 1 << 20


def test_peak_of_sequential_allocations():
    with track_peak("cpu", []) as result:
        a = torch.empty(4 * MIB, dtype=torch.uint8)
        del a
        b = torch.empty(4 * MIB, dtype=torch.uint8)
        c = torch.empty(4 * MIB, dtype=torch.uint8)
        del b, c
    assert result.peak_bytes == 8 * MIB
    assert result.baseline_bytes == 0
    assert result.extra["end_increment_bytes"] == 0


def test_views_and_inplace_ops_count_once():
    with track_peak("cpu", []) as result:
        a = torch.zeros(MIB // 4)  # 1 MiB of fp32
        view = a[:10]
        view.add_(1)
        a.mul_(2)
        b = a.view(-1, 4)
        del view, b
    assert result.peak_bytes == MIB
    del a


def test_baseline_counts_what_is_alive_and_is_not_counted_twice():
    weights = torch.zeros(MIB // 2)  # 2 MiB
    with track_peak("cpu", [weights]) as result:
        weights.add_(1)  # touches an existing storage
        out = weights * 2  # 2 MiB new
        total = out.sum()
    assert result.baseline_bytes == 2 * MIB
    assert result.peak_bytes == 4 * MIB + total.untyped_storage().nbytes()


def test_module_baseline_and_backward_are_tracked():
    layer = torch.nn.Linear(256, 256)
    assert live_bytes(layer) == (256 * 256 + 256) * 4
    x = torch.randn(64, 256, requires_grad=True)
    with track_peak("cpu", [layer, x]) as result:
        layer(x).pow(2).sum().backward()
    # Gradients of the weight, bias and input stay alive after the block.
    assert result.extra["end_increment_bytes"] >= (256 * 256 + 256 + 64 * 256) * 4
    assert result.peak_bytes > result.baseline_bytes + (256 * 256 + 64 * 256) * 4
