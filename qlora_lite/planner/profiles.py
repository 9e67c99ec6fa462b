"""Named hardware profiles (`--gpu t4`) and memory budgets (`--max-memory 14.5GiB`) for planning anywhere.

Each profile is a HardwareProfile with a fake GpuInfo carrying the real compute capability, and the memory
PyTorch actually sees on that card (`torch.cuda.get_device_properties(0).total_memory`, which is below the
marketing size) as `usable_memory_override_bytes`.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

from qlora_lite.errors import UserError
from qlora_lite.planner.hardware import GpuInfo, HardwareProfile, detect

GIB = 1024**3

# name: (device name, usable GiB as PyTorch reports it, compute capability, host RAM GiB)
_GPUS: dict[str, tuple[str, float, tuple[int, int], float]] = {
    "t4": ("Tesla T4", 14.6, (7, 5), 12.7),
    "v100": ("Tesla V100-SXM2-16GB", 15.8, (7, 0), 25.0),
    "l4": ("NVIDIA L4", 22.0, (8, 9), 51.0),
    "a10g": ("NVIDIA A10G", 22.0, (8, 6), 32.0),
    "rtx3090": ("NVIDIA GeForce RTX 3090", 23.6, (8, 6), 64.0),
    "rtx4090": ("NVIDIA GeForce RTX 4090", 23.6, (8, 9), 64.0),
    "l40s": ("NVIDIA L40S", 44.4, (8, 9), 128.0),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", 39.4, (8, 0), 83.0),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", 79.1, (8, 0), 167.0),
    "h100-80gb": ("NVIDIA H100 80GB HBM3", 79.1, (9, 0), 200.0),
}
_ALIASES = {"a100": "a100-40gb", "h100": "h100-80gb", "a10": "a10g", "3090": "rtx3090", "4090": "rtx4090"}
CPU_PROFILE_RAM_GIB = 16.0
KNOWN_PROFILES = (*_GPUS, "cpu")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: str | int | float) -> int:
    """'14.5GiB', '16GB', '800MB', '2e9' or a number of bytes -> bytes. GB is 1e9, GiB is 2**30."""
    if isinstance(value, bool):
        raise UserError(f"memory size {value!r} is not a size: give e.g. 14.5GiB, 16GB or 800MB")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise UserError(f"memory size {value!r} must be positive: give e.g. 14.5GiB, 16GB or 800MB")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UserError(f"memory size {value!r} is not understood: give e.g. 14.5GiB, 16GB or 800MB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UserError(f"memory size {value!r} must be positive: give e.g. 14.5GiB, 16GB or 800MB")
    return size


def _gpu_profile(key: str) -> HardwareProfile:
    device, usable_gib, capability, ram_gib = _GPUS[key]
    usable = int(usable_gib * GIB)
    return HardwareProfile(
        accelerator="cuda",
        gpus=(GpuInfo(0, device, usable, usable, capability),),
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=int(ram_gib * GIB * 0.85),
        disk_free_bytes=100 * GIB,
        disk_path=".",
        environment="local",
        cpu_count=8,
        usable_memory_override_bytes=usable,
        name=key,
        notes=(f"named profile: {device}, {usable_gib} GiB usable as PyTorch sees it",),
    )


def get_profile(name: str) -> HardwareProfile:
    """A named profile ('t4', 'a100-80gb', 'cpu', ...); unknown names -> UserError listing the known ones."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in _GPUS:
        return _gpu_profile(key)
    if key == "cpu":
        ram = int(CPU_PROFILE_RAM_GIB * GIB)
        return HardwareProfile(
            accelerator="cpu",
            gpus=(),
            ram_total_bytes=ram,
            ram_available_bytes=ram,
            disk_free_bytes=100 * GIB,
            disk_path=".",
            environment="local",
            cpu_count=2,
            usable_memory_override_bytes=ram,
            name="cpu",
            notes=(f"named profile: CPU with {CPU_PROFILE_RAM_GIB:.0f} GiB of RAM for training",),
        )
    raise UserError(f"unknown hardware profile {name!r}: known profiles are {', '.join(KNOWN_PROFILES)}")


def profile_with_budget(max_memory: str | int, base: HardwareProfile | str | None = None) -> HardwareProfile:
    """`base` (a profile, a name, or the detected machine) with its usable memory capped at `max_memory`."""
    base = resolve_hardware(base)
    budget = parse_size(max_memory)
    name = f"{base.name} (budget {budget / GIB:.2f} GiB)"
    return replace(base, usable_memory_override_bytes=budget, name=name)


def resolve_hardware(
    hardware: HardwareProfile | str | None, where: str | os.PathLike | None = None
) -> HardwareProfile:
    """The one place a run's hardware is decided, before planning: a profile as is, a profile name
    ("t4", "a100-80gb", "cpu"), or None: this machine, with the free disk measured at `where`."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    if not hardware:
        return detect(where)
    if isinstance(hardware, str):
        return get_profile(hardware)
    raise UserError(f"hardware must be a profile name like 't4' or a HardwareProfile, got {hardware!r}")
