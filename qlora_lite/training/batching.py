"""How one optimizer step's examples become micro-batches, with as little padding as possible.

Two layouts, both fixed by the step's examples alone (so OOM backoff and resume see the same rows):

- packed: the step's examples are bin-packed (best fit decreasing) into rows of at most `capacity` tokens.
  Each row is flattened with transformers' `DataCollatorWithFlattening`: position ids restart at 0 for every
  example and the first label of each example is -100, and no attention mask is passed. transformers 5.x
  (`masking_utils.find_packed_sequence_indices`) turns restarting position ids into a block-diagonal causal
  mask (SDPA, eager, flex) or varlen sequence boundaries (FlashAttention), so no token attends to another
  example. The padding at the end of a shorter row forms its own block and carries no loss.
- padded: one example per row, right-padded to the longest row of the micro-batch, rows grouped by length
  (the fallback for models whose attention ignores packed position ids).

A micro-batch is `micro_batch_size` rows. Every batch also carries, computed on the host, the flat indices of
the positions that have a target and the targets themselves, so the loss can run on those positions only
without a device-to-host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora_lite.data.encoding import Example

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """Model inputs of one micro-batch and where its loss is (flat indices into the shifted (rows, width-1))."""

    inputs: dict[str, torch.Tensor]  # input_ids + attention_mask (padded) or position_ids (packed)
    labels: torch.Tensor
    loss_positions: torch.Tensor
    loss_targets: torch.Tensor
    tokens: int  # non-padding tokens


def split_micro_batches(indices: Sequence[int], examples: Sequence, micro_batch_size: int) -> list[list[int]]:
    """Cut one step's examples into micro-batches of similar length (less padding); deterministic."""
    by_length = sorted(indices, key=lambda i: (len(examples[i].input_ids), i))
    return [by_length[i : i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]


def pack_rows(indices: Sequence[int], examples: Sequence[Example], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of at most `capacity` tokens; deterministic (ties broken by index).

    trl.pack_dataset does the same over a whole `datasets.Dataset`; here only one step's examples (a handful)
    are packed, so a step stays a fixed set of examples, and a plain loop is cheaper than an Arrow map.
    """
    order = sorted(indices, key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        best = -1
        for r, room in enumerate(free):
            if n <= room and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append([i])
            free.append(capacity - n)
        else:
            rows[best].append(i)
            free[best] -= n
    return rows


def row_groups(
    indices: Sequence[int],
    examples: Sequence[Example],
    micro_batch_size: int,
    capacity: int | None,
) -> list[list[list[int]]]:
    """The micro-batches of one step: each a list of rows, each row a list of example indices.

    `capacity` None: one example per row (padded layout). Otherwise packed rows of <= capacity tokens.
    """
    if capacity is None:
        rows = [[i] for i in sorted(indices, key=lambda i: (len(examples[i].input_ids), i))]
    else:
        packed = pack_rows(indices, examples, capacity)
        rows = sorted(packed, key=lambda row: (sum(len(examples[i].input_ids) for i in row), row[0]))
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


_flatten = None


def _flattener():
    global _flatten
    if _flatten is None:
        from transformers import DataCollatorWithFlattening

        _flatten = DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)
    return _flatten


def collate_rows(
    rows: Sequence[Sequence[Example]], pad_token_id: int, device: torch.device | str, packed: bool
) -> MicroBatch:
    """Tensors for a micro-batch of rows, right-padded to its longest row."""
    flat = []
    for row in rows:
        if packed:
            features = [{"input_ids": e.input_ids, "labels": e.labels} for e in row]
            out = _flattener()(features)
            flat.append((out["input_ids"][0], out["labels"][0], out["position_ids"][0]))
        else:
            (example,) = row
            ids = torch.tensor(example.input_ids, dtype=torch.long)
            flat.append((ids, torch.tensor(example.labels, dtype=torch.long), None))
    width = max(len(ids) for ids, _, _ in flat)
    input_ids = torch.full((len(flat), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(flat), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(flat), width), dtype=torch.long)
    tokens = 0
    for r, (ids, lab, pos) in enumerate(flat):
        n = len(ids)
        tokens += n
        input_ids[r, :n] = ids
        labels[r, :n] = lab
        if packed:
            # Padding restarts its own positions: a block of its own that no example attends to.
            extra[r, :n] = pos
            extra[r, n:] = torch.arange(width - n)
        else:
            extra[r, :n] = 1
    targets = labels[:, 1:]
    positions = (targets != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    non_blocking = torch.device(device).type == "cuda"
    inputs = {
        "input_ids": input_ids.to(device, non_blocking=non_blocking),
        ("position_ids" if packed else "attention_mask"): extra.to(device, non_blocking=non_blocking),
    }
    return MicroBatch(
        inputs=inputs,
        labels=labels.to(device, non_blocking=non_blocking),
        loss_positions=positions.to(device, non_blocking=non_blocking),
        loss_targets=targets.reshape(-1)[positions].to(device, non_blocking=non_blocking),
        tokens=tokens,
    )


def fullest_rows(examples: Sequence[Example], rows: int, capacity: int | None) -> list[int]:
    """Example indices that make `rows` rows as long as the data allows: what the OOM probe runs first."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    if capacity is None:
        return order[:rows]
    chosen = order[:rows]
    room = [capacity - len(examples[i].input_ids) for i in chosen]
    # Fill each row's remaining room with the shortest examples, as packing would.
    for i in reversed(order[rows:]):
        n = len(examples[i].input_ids)
        r = max(range(len(room)), key=lambda k: room[k], default=None)
        if r is None or n > room[r]:
            break
        chosen.append(i)
        room[r] -= n
    return chosen
