"""The causal-LM loss on supervised positions only, in chunks, so full-vocabulary fp32 logits never exist.

The standard path (`model(..., labels=...)`) computes logits for every position of every row, upcasts them to
fp32 and keeps them (and the log-softmax) for backward: for a 150k-256k vocabulary that is the peak of a small
model's step. Here the decoder's last hidden states are gathered at the positions that have a target (known on
the host from the labels), and the LM head + cross-entropy run over chunks of those positions. The gradient
with respect to the hidden states is computed in the same pass (softmax - one-hot) and kept (positions x
hidden, small), so backward costs nothing extra and no chunk's logits outlive the chunk.

It applies when the LM head is frozen (LoRA never targets it) and the model's logits are a plain linear map
of the decoder output; `LossPath.check` compares it with the model's own loss once per run and falls back
to the standard path otherwise (e.g. logit soft-capping or scaling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Elements of one chunk of logits (positions x vocab): 2^23 fp32 = 32 MiB.
CHUNK_ELEMENTS = 2**23


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk of the chunked loss for a vocabulary."""
    return max(16, CHUNK_ELEMENTS // max(1, vocab_size))


log = logging.getLogger(__name__)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over positions of CE(hidden @ W^T + b, target) / denominator, gradient computed while chunking."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk):  # noqa: ANN001
        n = hidden.shape[0]
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = None
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = F.linear(h, weight, bias)  # in the autocast dtype when autocast is on
            if w is None:
                w = weight.to(logits.dtype)
            logits32 = logits.float()
            del logits
            lse = torch.logsumexp(logits32, dim=-1)
            total += (lse - logits32.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits32.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start : start + chunk] = (probs.div_(denominator).to(w.dtype) @ w).to(grad.dtype)
            del logits32
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    denominator: int,
    chunk: int,
) -> torch.Tensor:
    """Summed token cross-entropy of `hidden` (positions x hidden) through a frozen linear head, / denominator."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy needs a frozen head")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, float(denominator), chunk)


@dataclass
class LossPath:
    """How a micro-batch's loss is computed: chunked on supervised positions, or the model's own loss."""

    chunked: bool = True

    def __call__(self, model: torch.nn.Module, batch, denominator: int) -> torch.Tensor:  # noqa: ANN001
        if not self.chunked:
            num_items = torch.tensor(denominator, device=batch.labels.device)
            return model(**batch.inputs, labels=batch.labels, num_items_in_batch=num_items).loss
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        hidden = base.get_decoder()(**batch.inputs, use_cache=False).last_hidden_state
        width = hidden.shape[-1]
        shifted = hidden[:, :-1].reshape(-1, width)
        selected = shifted.index_select(0, batch.loss_positions)
        return linear_cross_entropy(
            selected,
            head.weight,
            head.bias,
            batch.loss_targets,
            denominator,
            chunk_positions(head.weight.shape[0]),
        )

    @staticmethod
    def usable(model: torch.nn.Module) -> str | None:
        """None when the chunked loss can apply to `model`, else why not."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
            return "the LM head is not a plain Linear layer"
        if head.weight.requires_grad:
            return "the LM head is trained"
        try:
            base.get_decoder()
        except (AttributeError, NotImplementedError):
            return "the model exposes no decoder"
        return None
