"""Detect the machine once and describe it as a frozen HardwareProfile (facts only, no decisions)."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    compute_capability: tuple[int, int]

    @property
    def native_bf16(self) -> bool:
        # torch.cuda.is_bf16_supported() says True on a T4 (emulated, slow); Ampere (8.0) and newer have it.
        return self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class HardwareProfile:
    accelerator: str  # "cuda" | "mps" | "cpu"
    gpus: tuple[GpuInfo, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    disk_path: str
    environment: str  # "colab" | "kaggle" | "local"
    cpu_count: int = 1
    # Memory a run may use on one device as PyTorch sees it; for named profiles, the measured usable figure.
    usable_memory_override_bytes: int | None = None
    name: str = "detected"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def native_bf16(self) -> bool:
        if self.accelerator == "cuda":
            return bool(self.gpus) and all(g.native_bf16 for g in self.gpus)
        return self.accelerator == "mps"

    @property
    def usable_memory_bytes(self) -> int:
        """Memory one training process may fill: the smallest GPU's total, or the host's available RAM."""
        if self.usable_memory_override_bytes is not None:
            return self.usable_memory_override_bytes
        if self.accelerator == "cuda" and self.gpus:
            return min(g.total_memory_bytes for g in self.gpus)
        return self.ram_available_bytes

    def to_dict(self) -> dict:
        data = asdict(self)
        data["native_bf16"] = self.native_bf16
        data["usable_memory_bytes"] = self.usable_memory_bytes
        return data


def detect_environment(env: dict[str, str] | None = None) -> str:
    """Colab, Kaggle or local, from variables that a `!python` subprocess inherits too."""
    env = dict(os.environ) if env is None else env
    if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env or "COLAB_BACKEND_VERSION" in env:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env:
        return "kaggle"
    return "local"


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def detect(output_dir: str | os.PathLike | None = None) -> HardwareProfile:
    """Read the machine: GPUs (name, memory, compute capability), RAM, free disk where the run writes."""
    import torch

    gpus: list[GpuInfo] = []
    accelerator = "cpu"
    if torch.cuda.is_available():
        accelerator = "cuda"
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(GpuInfo(index, props.name, int(total), int(free), (props.major, props.minor)))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        accelerator = "mps"
    memory = psutil.virtual_memory()
    disk_path = _existing_parent(Path(output_dir or "."))
    return HardwareProfile(
        accelerator=accelerator,
        gpus=tuple(gpus),
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        disk_free_bytes=int(shutil.disk_usage(disk_path).free),
        disk_path=str(disk_path),
        environment=detect_environment(),
        cpu_count=os.cpu_count() or 1,
    )


def format_bytes(n: float) -> str:
    """Human size in binary units, e.g. '14.6 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe(profile: HardwareProfile) -> list[tuple[str, str]]:
    """Rows for `qlora-lite doctor`."""
    rows = [("accelerator", profile.accelerator), ("environment", profile.environment)]
    for g in profile.gpus:
        rows.append(
            (
                f"gpu {g.index}",
                f"{g.name}, {format_bytes(g.total_memory_bytes)} total, {format_bytes(g.free_memory_bytes)} free, "
                f"compute capability {g.compute_capability[0]}.{g.compute_capability[1]}",
            )
        )
    rows += [
        ("native bf16", "yes" if profile.native_bf16 else "no"),
        ("cpu cores", str(profile.cpu_count)),
        (
            "ram",
            f"{format_bytes(profile.ram_total_bytes)} total, {format_bytes(profile.ram_available_bytes)} available",
        ),
        ("disk", f"{format_bytes(profile.disk_free_bytes)} free at {profile.disk_path}"),
    ]
    return rows
