"""Decide once per run, by checking the loaded model itself, whether packing and the chunked loss apply.

(Not wired into the trainer on main yet: the wiring lives on branch `speed-full`, see issue [13].)

A list of architectures would go stale; a check on the real model does not. Two short examples are run
without gradients: packed into one row, the second example's log-probabilities must equal those it gets alone
(no attention across examples), and the chunked loss must equal the model's own loss. A model that fails a
check trains with the fallback (length-grouped padded rows, the model's own loss) and the log says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora_lite.data.encoding import Example
from qlora_lite.training.batching import collate_rows
from qlora_lite.training.loss import LossPath

log = logging.getLogger(__name__)

PROBE_TOKENS = 24  # per example: enough for attention to matter, cheap on any model


@dataclass(frozen=True)
class FastPaths:
    pack_capacity: int | None  # None: padded rows
    loss: LossPath
    notes: tuple[str, ...] = ()

    @property
    def packing(self) -> bool:
        return self.pack_capacity is not None


def _probe_examples(examples: Sequence[Example]) -> list[Example] | None:
    chosen = []
    for example in examples:
        n = min(len(example.input_ids), PROBE_TOKENS)
        if n >= 4 and any(label != -100 for label in example.labels[1:n]):
            chosen.append(Example(example.input_ids[:n], example.labels[:n]))
        if len(chosen) == 2:
            return chosen
    return None


def _tolerance(autocast_dtype: torch.dtype | None) -> float:
    return 2e-3 if autocast_dtype is None else 6e-2


def choose_fast_paths(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None,
    *,
    packing: bool,
    chunked_loss: bool,
    capacity: int,
) -> FastPaths:
    """Check the model, return the paths to train with (falling back where a check fails)."""
    from qlora_lite.training.loop import autocast

    notes: list[str] = []
    probe = _probe_examples(examples)
    if chunked_loss and (why := LossPath.usable(model)) is not None:
        chunked_loss = False
        notes.append(f"chunked loss off: {why}")
    if probe is None or not (packing or chunked_loss):
        if probe is None and (packing or chunked_loss):
            notes.append("no example long enough to check packing and the chunked loss: both off")
        return FastPaths(None, LossPath(chunked=False), tuple(notes))
    tol = _tolerance(autocast_dtype)
    was_training = model.training
    model.eval()  # no dropout: the same input must give the same numbers
    try:
        with torch.no_grad(), autocast(device, autocast_dtype):
            if packing:
                packed = collate_rows([probe], pad_token_id, device, packed=True)
                alone = collate_rows([[probe[1]]], pad_token_id, device, packed=False)
                together = model(**packed.inputs).logits.float().log_softmax(-1)[0, len(probe[0].input_ids) :]
                single = model(**alone.inputs).logits.float().log_softmax(-1)[0]
                gap = (together - single).abs().max().item()
                if gap > tol:
                    packing = False
                    notes.append(
                        f"packing off: this model's attention crosses packed examples (gap {gap:.3g}); "
                        "length-grouped padded micro-batches instead"
                    )
            if chunked_loss:
                batch = collate_rows([[e] for e in probe], pad_token_id, device, packed=False)
                denominator = max(1, len(batch.loss_targets))
                ours = LossPath(chunked=True)(model, batch, denominator).item()
                theirs = LossPath(chunked=False)(model, batch, denominator).item()
                if abs(ours - theirs) > tol * max(1.0, abs(theirs)):
                    chunked_loss = False
                    notes.append(
                        f"chunked loss off: it gives {ours:.5g} where the model's own loss is {theirs:.5g} "
                        "(logit scaling or soft-capping?)"
                    )
    finally:
        model.train(was_training)
    for note in notes:
        log.info("%s", note)
    return FastPaths(capacity if packing else None, LossPath(chunked=chunked_loss), tuple(notes))
