"""Measure the peak memory of a piece of work (a training step), on CUDA or on CPU.

On CUDA this is `torch.cuda.max_memory_allocated` after a reset. On CPU PyTorch keeps no allocator
statistics, so a TorchDispatchMode watches every op: each output storage is counted once (deduplicated by
storage), and a weakref on the storage removes it when it is freed. What the tracker reports:

- `baseline_bytes`: bytes of tensors already alive when tracking starts (the model's parameters, buffers and
  bitsandbytes quant states, the optimizer state), found from `baseline_from` or, by default, from every
  tensor the garbage collector knows about;
- `peak_bytes`: the highest value of baseline + bytes allocated inside the block and still alive.

So `peak_bytes` is directly comparable with `memory.estimate_memory(...).peak_bytes`.
Allocations made inside a custom kernel that never surface as op outputs (scratch buffers) are not seen.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class PeakResult:
    """Filled in when the `track_peak` block exits."""

    peak_bytes: int = 0
    baseline_bytes: int = 0
    device: str = "cpu"
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def increment_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes


def _storage_key(storage: torch.UntypedStorage) -> int:
    return storage.data_ptr() or id(storage)


def _tensors_of(obj: object) -> Iterator[torch.Tensor]:
    """Tensors held by a module (params, buffers, bitsandbytes quant states), an optimizer or an iterable."""
    if isinstance(obj, torch.Tensor):
        yield obj
        state = getattr(obj, "quant_state", None)
        if state is not None:
            yield from _quant_state_tensors(state)
    elif isinstance(obj, torch.nn.Module):
        for tensor in list(obj.parameters()) + list(obj.buffers()):
            yield from _tensors_of(tensor)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_of(value)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for item in obj:
            yield from _tensors_of(item)


def _quant_state_tensors(state: object) -> Iterator[torch.Tensor]:
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested)


def _all_live_tensors() -> Iterator[torch.Tensor]:
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                yield obj
        except ReferenceError:  # a weakproxy whose target is gone
            continue


def live_bytes(objects: object = None, device: str = "cpu") -> int:
    """Bytes of distinct storages on `device` held by `objects` (None: every tensor alive in the process)."""
    tensors = _all_live_tensors() if objects is None else _tensors_of(objects)
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type != device or tensor.is_meta:
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or wrapper subclasses without a storage
            continue
        seen[_storage_key(storage)] = storage.nbytes()
    return sum(seen.values())


class _StorageTracker(TorchDispatchMode):
    """Counts each storage created by an op once, until it is freed."""

    def __init__(self, device: str, known: set[int]) -> None:
        super().__init__()
        self.device = device
        self.known = known  # storages alive before tracking (part of the baseline): never counted again
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def watch_known(self, storages: list[torch.UntypedStorage]) -> None:
        """Forget a baseline storage once it is freed, so that a new one at the same address counts."""
        for storage in storages:
            key = _storage_key(storage)
            if key not in self._refs:
                self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self.known.discard(key))

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor) or value.device.type != self.device:
                continue
            storage = value.untyped_storage()
            key = _storage_key(storage)
            if key in self.known or key in self.live:
                continue
            nbytes = storage.nbytes()
            self.live[key] = nbytes
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


@contextmanager
def track_peak(device: str | torch.device = "cpu", baseline_from: object = None) -> Iterator[PeakResult]:
    """Measure peak memory of the block: `with track_peak("cpu", model) as result: step()`.

    `baseline_from`: what is alive before the block and counts toward the peak (a model, an optimizer, a
    list of them). None takes every live tensor on the device. On CUDA the baseline is the allocator's
    current allocation and `baseline_from` is ignored.
    """
    kind = torch.device(device).type
    result = PeakResult(device=kind)
    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result.baseline_bytes = int(torch.cuda.memory_allocated())
        try:
            yield result
        finally:
            torch.cuda.synchronize()
            result.peak_bytes = int(torch.cuda.max_memory_allocated())
        return
    gc.collect()
    tensors = _all_live_tensors() if baseline_from is None else _tensors_of(baseline_from)
    known: dict[int, int] = {}
    storages: list[torch.UntypedStorage] = []
    for tensor in tensors:
        if tensor.device.type == kind and not tensor.is_meta:
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            known[_storage_key(storage)] = storage.nbytes()
            storages.append(storage)
    result.baseline_bytes = sum(known.values())
    tracker = _StorageTracker(kind, set(known))
    tracker.watch_known(storages)
    try:
        with tracker:
            yield result
    finally:
        result.peak_bytes = result.baseline_bytes + tracker.peak
        result.extra["end_increment_bytes"] = tracker.current
