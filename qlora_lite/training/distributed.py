"""Data-parallel ranks under `torchrun` / `accelerate launch`: the same run, its steps split across processes.

Each optimizer step still consumes the fixed group of examples that `loop.step_examples` names; every rank
takes its share of that group, divides its token losses by the supervised tokens of the *whole* group (all
ranks together), and the ranks sum their gradients once per step. The update is therefore the one a single
process makes with the same effective batch (up to float summation order), on any number of ranks, and a
resume on another world size only re-splits the step's examples.

Why one all-reduce per step after the local backward instead of `DistributedDataParallel`'s hooks: DDP
all-reduces inside `backward()`, so a rank that runs out of memory mid-step (and backs off, see loop.py) or
that has no examples in an epoch's short last step would leave the others waiting in a half-done collective.
LoRA gradients are a few MB, so summing them in buckets after the backward costs little.

Rank 0 alone writes the run folder (checkpoints, step log, record, push); the others wait for it.
The launcher is PyTorch's own (`python -m torch.distributed.run`), never one of ours.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from qlora_lite.errors import UserError
from qlora_lite.planner.hardware import HardwareProfile

log = logging.getLogger(__name__)

BUCKET_ELEMENTS = 8 * 1024 * 1024  # 32 MB of fp32 gradients per all-reduce
# Rank 0 may push to the Hub or wait for a durable copy while the others wait at a barrier.
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes of one run (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def ranks_from_environment(env: Mapping[str, str] | None = None) -> Ranks:
    """The variables torchrun and accelerate launch set for every process (absent: one process)."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            raise UserError(f"environment variable {name}={env.get(name)!r} is not an integer") from None

    world = number("WORLD_SIZE", 1)
    ranks = Ranks(
        rank=number("RANK", 0),
        world_size=world,
        local_rank=number("LOCAL_RANK", 0),
        local_world_size=number("LOCAL_WORLD_SIZE", world),
    )
    if not 0 <= ranks.rank < ranks.world_size:
        raise UserError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world_size}")
    return ranks


def init_ranks(env: Mapping[str, str] | None = None) -> tuple[Ranks, bool]:
    """Join the process group if this process was started by a launcher: (ranks, whether we started it).

    gloo on CPU, nccl on CUDA (each rank on the GPU of its LOCAL_RANK). A group the caller already made
    (e.g. their own accelerate script) is used as it is and left to them to close.
    """
    import torch.distributed as dist

    ranks = ranks_from_environment(env)
    if not ranks.active:
        return ranks, False
    if dist.is_initialized():
        return replace(ranks, rank=dist.get_rank(), world_size=dist.get_world_size()), False
    cuda = torch.cuda.is_available()
    if cuda:
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {ranks.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if not ranks.is_main:
        # One voice: rank 0 logs progress; the others only report problems.
        logging.getLogger("qlora_lite").setLevel(logging.WARNING)
    log.info("rank %d of %d (%s)", ranks.rank, ranks.world_size, dist.get_backend())
    return ranks, True


def close_ranks(started: bool) -> None:
    import torch.distributed as dist

    if started and dist.is_initialized():
        dist.destroy_process_group()


def rank_hardware(hardware: HardwareProfile, ranks: Ranks) -> HardwareProfile:
    """The machine as one rank sees it: its own GPU; on CPU, its share of the host's free RAM."""
    if not ranks.active:
        return hardware
    if hardware.accelerator == "cuda" and hardware.gpus:
        own = [g for g in hardware.gpus if g.index == ranks.local_rank] or [hardware.gpus[0]]
        return replace(hardware, gpus=tuple(own), name=f"{hardware.name} (rank {ranks.rank}: {own[0].name})")
    share = hardware.usable_memory_bytes // max(1, ranks.local_world_size)
    return replace(
        hardware,
        usable_memory_override_bytes=share,
        name=f"{hardware.name} (rank {ranks.rank}: 1/{ranks.local_world_size} of the host memory)",
    )


def rank_share(indices: Sequence[int], lengths: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's examples of one step: longest-first, dealt in turn, so the ranks' token counts balance.

    Deterministic, disjoint, and together exactly `indices`; a rank may get none (a short last step).
    """
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    return ordered[rank::world_size]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank for one step (LoRA dropout): a pure function, so a resume needs no rank RNG."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DataParallel:
    """The StepRunner's hook for several ranks: which examples are this rank's, and the gradient sum."""

    def __init__(self, ranks: Ranks, lengths: Sequence[int], seed: int) -> None:
        self.ranks, self.lengths, self.seed = ranks, lengths, seed

    def local(self, indices: Sequence[int], step: int) -> list[int]:
        torch.manual_seed(step_seed(self.seed, step, self.ranks.rank))
        return rank_share(indices, self.lengths, self.ranks.rank, self.ranks.world_size)

    def reduce(self, loss: float, optimizer: torch.optim.Optimizer) -> float:
        """Sum gradients (missing ones count as zeros) and the step's loss over the ranks."""
        import torch.distributed as dist

        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        for bucket in _buckets(params):
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                    for p in bucket
                ]
            )
            dist.all_reduce(flat)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
        total = torch.tensor([loss], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return float(total.item())


def _buckets(params: Sequence[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    buckets: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() > BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return [b for b in buckets if b]


def broadcast_parameters(model: torch.nn.Module, ranks: Ranks) -> None:
    """Every rank starts from rank 0's trainable weights (what DDP does when it wraps a model)."""
    if not ranks.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            dist.broadcast(param.data, src=0)


def from_main(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not ranks.active:
        return value
    import torch.distributed as dist

    box = [value if ranks.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


class SharedCheckpoint:
    """The checkpoint rank 0 found, with its files, on every rank (no shared disk needed).

    `read(info, name)` answers like `CheckpointStore.read`, so `checkpoint.resume.restore` works unchanged.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read(self, info: Any, name: str) -> bytes:
        return self.files[name]


def share_latest(store: Any, latest: Any, ranks: Ranks) -> tuple[Any, Any]:
    """(latest, a reader of its files) on every rank; rank 0 reads the files from its verified store."""
    if not ranks.active:
        return latest, store
    payload = None
    if ranks.is_main and latest is not None:
        payload = (latest, {name: store.read(latest, name) for name in latest.manifest.get("files", {})})
    payload = from_main(payload if ranks.is_main else None, ranks)
    if payload is None:
        return None, store
    info, files = payload
    return info, (store if ranks.is_main else SharedCheckpoint(files))


class MainRankCheckpointer:
    """Rank 0 decides when to save and saves; every rank waits until the checkpoint is written."""

    def __init__(self, checkpointer: Any, ranks: Ranks) -> None:
        self.inner, self.ranks = checkpointer, ranks

    def __getattr__(self, name: str) -> Any:  # saves, seconds_saving, ...
        return getattr(self.inner, name)

    def due(self, state: Any) -> bool:
        return bool(from_main(self.inner.due(state) if self.ranks.is_main else None, self.ranks))

    def save(self, state: Any) -> Any:
        info = self.inner.save(state) if self.ranks.is_main else None
        barrier(self.ranks)
        return info

    def at_step_end(self, state: Any, total_steps: int, callbacks: Any = ()) -> None:
        """`Checkpointer.at_step_end` for every rank: rank 0 decides whether to save (due, or Ctrl-C/SIGTERM
        noted on it mid-step), every rank saves and stops together."""
        interrupts = getattr(self, "interrupts", None)  # set on this wrapper while the loop runs
        noted = interrupts is not None and interrupts.pending is not None
        stopping = bool(from_main(noted if self.ranks.is_main else None, self.ranks))
        if stopping or (state.step < total_steps and self.due(state)):
            self.save(state)
        for callback in callbacks:
            if hasattr(callback, "on_step_end"):
                callback.on_step_end(state)
        if stopping:
            self.inner.store.flush(timeout=60)
            if interrupts is not None and interrupts.pending is not None:
                interrupts.stop()
            raise KeyboardInterrupt  # rank 0 was interrupted: this rank stops with it


class FollowerStore:
    """What a rank other than 0 has instead of the checkpoint store: nothing to write, nothing to wait for."""

    backend = None
    last_durable_error = None

    def latest(self) -> None:
        return None

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True


def check_world_size(
    effective_batch_size: int, ranks: Ranks, saved_world_size: int | None, dropout: float = 0.0
) -> None:
    """Refuse a world size that cannot run the fixed effective batch; say when a resume re-splits steps."""
    if ranks.world_size > effective_batch_size:
        raise UserError(
            f"{ranks.world_size} processes but each optimizer step takes {effective_batch_size} examples: "
            f"{ranks.world_size - effective_batch_size} rank(s) would idle. Start at most "
            f"{effective_batch_size} processes, or (new runs only) raise --effective-batch-size"
        )
    if saved_world_size is not None and saved_world_size != ranks.world_size:
        log.warning(
            "resuming a run checkpointed on %d process(es) on %d: each step's %d examples are split anew "
            "(same effective batch, same examples per step; sums differ only in float rounding%s)",
            saved_world_size, ranks.world_size, effective_batch_size,
            ", and LoRA dropout draws other masks" if dropout else "",
        )  # fmt: skip


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """`argv` less `flag VALUE` / `flag=VALUE` (the launcher's own flag must not reach the ranks)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m qlora_lite ARGV` (a free port)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "qlora_lite", *argv,
    ]  # fmt: skip


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Start `nproc` ranks of `qlora-lite ARGV` with PyTorch's launcher and wait; returns its exit status."""
    import subprocess

    if torch.cuda.is_available():
        if nproc > torch.cuda.device_count():
            raise UserError(
                f"--gpus {nproc} but this machine has {torch.cuda.device_count()} GPU(s): use --gpus "
                f"{torch.cuda.device_count()} or fewer"
            )
    else:
        log.warning("no GPU here: starting %d CPU processes (gloo) instead", nproc)
    command = torchrun_command(nproc, argv)
    log.info("starting: %s", " ".join(command))
    return subprocess.call(command)
