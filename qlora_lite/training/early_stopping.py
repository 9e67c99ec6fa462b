"""Early stopping on eval loss, and the best adapter kept aside.

The decision state (best loss, its step, evaluations since it) lives in `LoopState`, so a checkpoint saves it
and a resumed run stops at the same step as an uninterrupted one. The best adapter's weights live in memory
between evaluations and go into each checkpoint as one more file (`BEST_ADAPTER`), so resume restores them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

BEST_ADAPTER = "best_adapter.safetensors"  # inside a checkpoint: the best-eval trainable weights so far


@dataclass
class BestTracker:
    """Follows the eval losses of a run: which was best, and whether patience has run out."""

    patience: int | None = None  # evaluations without improvement before stopping; None: never stop early
    keep_best: bool = False  # keep the best weights (to become the run's adapter at the end)
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def update(self, state, eval_loss: float, model: torch.nn.Module) -> bool:
        """Record one evaluation in `state`; True when training should stop now."""
        if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
            state.best_eval_loss = eval_loss
            state.best_step = state.step
            state.evals_since_best = 0
            if self.keep_best:
                self.best_weights = trainable_weights(model)
        else:
            state.evals_since_best += 1
        if self.patience is not None and state.evals_since_best >= self.patience:
            state.stopped_early_at = state.step
            return True
        return False

    def checkpoint_files(self) -> dict[str, bytes]:
        return {BEST_ADAPTER: save_safetensors(self.best_weights)} if self.best_weights else {}

    def restore(self, data: bytes | None) -> None:
        self.best_weights = load_safetensors(data) if data else None

    def apply_best(self, model: torch.nn.Module) -> bool:
        """Load the best weights into `model` (for saving it as the run's adapter); False if none."""
        if not self.best_weights:
            return False
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.best_weights.items():
                params[name].copy_(tensor.to(params[name].device))
        return True


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
