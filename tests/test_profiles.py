"""Named hardware profiles and memory sizes."""

from __future__ import annotations

import pytest

from qlora_lite.errors import UserError
from qlora_lite.planner.profiles import KNOWN_PROFILES, get_profile, parse_size, profile_with_budget

GIB = 1024**3


@pytest.mark.parametrize(
    "name,usable_gib,bf16",
    [("t4", 14.6, False), ("v100", 15.8, False), ("l4", 22.0, True), ("a10g", 22.0, True),
     ("a100-80gb", 79.1, True), ("h100-80gb", 79.1, True)],
)  # fmt: skip
def test_gpu_profiles(name, usable_gib, bf16):
    profile = get_profile(name)
    assert profile.accelerator == "cuda"
    assert profile.usable_memory_bytes == pytest.approx(usable_gib * GIB, rel=0.001)
    assert profile.native_bf16 is bf16
    assert profile.name == name


def test_every_listed_profile_builds_and_cpu_has_no_gpu():
    for name in KNOWN_PROFILES:
        assert get_profile(name).usable_memory_bytes > 0
    cpu = get_profile("cpu")
    assert cpu.accelerator == "cpu" and cpu.gpus == ()
    assert get_profile("A100").name == "a100-40gb"


def test_unknown_profile_lists_known_names():
    with pytest.raises(UserError) as info:
        get_profile("tpu-v9")
    assert "tpu-v9" in str(info.value) and "t4" in str(info.value) and "a100-80gb" in str(info.value)


@pytest.mark.parametrize(
    "text,expected",
    [("14.5GiB", int(14.5 * GIB)), ("16GB", 16 * 10**9), ("800MB", 800 * 10**6), ("800 mib", 800 << 20),
     (123456, 123456), ("2e9", 2 * 10**9), ("1024", 1024)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-3GB", "", 0, "GB"])
def test_parse_size_rejects_with_an_example(bad):
    with pytest.raises(UserError, match="14.5GiB"):
        parse_size(bad)


def test_budget_overrides_usable_memory():
    profile = profile_with_budget("8GiB", "t4")
    assert profile.usable_memory_bytes == 8 * GIB
    assert profile.accelerator == "cuda" and not profile.native_bf16
    assert "budget" in profile.name
