from qlora_lite.planner.hardware import GpuInfo, HardwareProfile, detect, detect_environment, format_bytes


def test_environment_from_variables_a_subprocess_also_sees():
    assert detect_environment({"COLAB_RELEASE_TAG": "release-colab_20250101"}) == "colab"
    assert detect_environment({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}) == "kaggle"
    assert detect_environment({"HOME": "/root"}) == "local"


def test_bf16_by_compute_capability_not_by_torch_emulation():
    t4 = GpuInfo(0, "Tesla T4", 15 * 2**30, 15 * 2**30, (7, 5))
    a100 = GpuInfo(0, "A100", 80 * 2**30, 80 * 2**30, (8, 0))
    base = dict(
        ram_total_bytes=1, ram_available_bytes=1, disk_free_bytes=1, disk_path="/", environment="local"
    )
    assert not HardwareProfile("cuda", (t4,), **base).native_bf16
    assert HardwareProfile("cuda", (a100,), **base).native_bf16
    assert not HardwareProfile("cuda", (t4, a100), **base).native_bf16  # the weakest GPU decides
    assert HardwareProfile("cuda", (t4,), **base).usable_memory_bytes == 15 * 2**30


def test_detect_reads_this_machine(tmp_path):
    profile = detect(tmp_path / "not" / "yet" / "made")
    assert profile.accelerator in ("cpu", "cuda", "mps")
    assert profile.ram_total_bytes >= profile.ram_available_bytes > 0
    assert profile.disk_free_bytes > 0 and profile.disk_path == str(tmp_path.resolve())
    data = profile.to_dict()
    assert data["usable_memory_bytes"] == profile.usable_memory_bytes


def test_format_bytes():
    assert format_bytes(14.6 * 2**30) == "14.6 GiB"
    assert format_bytes(512) == "512 B"
