"""Early stopping on a constructed eval curve, and the best weights kept aside."""

from __future__ import annotations

import torch

from qlora_lite.training.early_stopping import BestTracker
from qlora_lite.training.loop import LoopState


def run_curve(losses, patience, keep_best=False):
    state, tracker = LoopState(), BestTracker(patience=patience, keep_best=keep_best)
    model = torch.nn.Linear(1, 1, bias=False)
    stopped = None
    for step, loss in enumerate(losses, start=1):
        state.step = step
        with torch.no_grad():
            model.weight.fill_(float(step))
        if tracker.update(state, loss, model):
            stopped = step
            break
    return state, tracker, stopped, model


def test_stops_after_patience_evaluations_without_improvement():
    state, _, stopped, _ = run_curve([3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 2.3], patience=2)
    assert stopped == 6 and state.stopped_early_at == 6
    assert (state.best_eval_loss, state.best_step) == (2.4, 4)


def test_no_patience_never_stops_and_equal_loss_is_no_improvement():
    state, _, stopped, _ = run_curve([2.0, 2.0, 2.0, 2.0], patience=None)
    assert stopped is None and state.best_step == 1 and state.evals_since_best == 3
    _, _, stopped, _ = run_curve([2.0, 2.0, 2.0, 2.0], patience=3)
    assert stopped == 4


def test_the_best_weights_are_the_ones_of_the_best_step_and_survive_a_checkpoint():
    state, tracker, _, model = run_curve([3.0, 1.0, 2.0, 2.5], patience=None, keep_best=True)
    assert state.best_step == 2 and model.weight.item() == 4.0
    copy = BestTracker(keep_best=True)
    copy.restore(tracker.checkpoint_files()["best_adapter.safetensors"])
    assert copy.apply_best(model) and model.weight.item() == 2.0
