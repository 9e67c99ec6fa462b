"""Per-device memory of a run spread over several devices (data parallel or FSDP); used by planner/memory.py."""

from __future__ import annotations

import math

GRADIENT_BUCKET_BYTES = 32 * 1024 * 1024  # training/distributed.py sums gradients in buckets of this size


def spread(breakdown, shape, targets, lora_r, weights, dbytes, world_size, fsdp) -> None:  # noqa: ANN001
    """Per-device bytes with several devices (in place).

    Data parallel: a full replica per device plus one flat gradient bucket for the all-reduce. FSDP: weights
    (4-bit storage in the compute dtype), LoRA, its gradients and optimizer states are split over the
    devices; the quantization state stays whole on each; two blocks (the running one and the prefetched
    next) are gathered whole at a time; activations, logits and the CUDA context are per device as before.
    """
    if not fsdp:
        breakdown["gradient_sync"] = min(breakdown["lora_grads"], GRADIENT_BUCKET_BYTES)
        return
    for key in ("base_linear_weights", "other_params", "lora_params", "lora_grads", "optimizer_states"):
        breakdown[key] = math.ceil(breakdown[key] / world_size)
    block_lora = lora_r * sum(layer.in_features + layer.out_features for layer in targets)
    breakdown["fsdp_gathered_blocks"] = int(2 * (weights / shape.num_layers + block_lora * dbytes))
