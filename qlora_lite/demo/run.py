"""`qlora-lite demo`: the built-in default run on a real model, with held-out accuracy before and after."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from qlora_lite.demo.model import ensure_demo_model
from qlora_lite.demo.task import is_correct, make_dataset, prompt_for
from qlora_lite.inference.generation import Generator
from qlora_lite.training.api import train
from qlora_lite.training.record import write_json_atomic

log = logging.getLogger(__name__)


def accuracy(generator: Generator, rows: list[dict], max_new_tokens: int = 48) -> tuple[float, list[str]]:
    answers = generator([prompt_for(r) for r in rows], max_new_tokens=max_new_tokens, batch_size=8)
    correct = sum(is_correct(a, r) for a, r in zip(answers, rows, strict=True))
    return 100.0 * correct / len(rows), answers


def run_demo(
    output_dir: str = "runs/demo",
    *,
    max_steps: int = 60,
    n_train: int = 480,
    n_eval: int = 32,
    progress: bool = True,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Train SmolLM2-135M-Instruct (4-bit) on the order-extraction task and measure held-out exact match."""
    started = time.time()
    model_dir = ensure_demo_model()
    out = Path(output_dir)
    train_rows, eval_rows = make_dataset(n_train=n_train, n_eval=n_eval)
    data_file = out.parent / f"{out.name}-data.jsonl"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))

    log.info("measuring the base model on %d held-out orders", len(eval_rows))
    before, before_answers = accuracy(Generator(model=str(model_dir)), eval_rows)
    settings: dict[str, Any] = {
        "max_steps": max_steps,
        "effective_batch_size": 8,
        "learning_rate": 3e-4,
        "lora_r": 16,
        "eval_fraction": 0.05,
        "overwrite": True,  # the demo owns its folder; re-running it starts again
        "progress": progress,
    }
    settings.update(train_overrides)
    result = train(str(model_dir), str(data_file), str(out), **settings)
    after, after_answers = accuracy(Generator(result.adapter_dir), eval_rows)
    summary = {
        "model": str(model_dir),
        "task": "order text -> JSON (exact match on held-out orders)",
        "held_out_examples": len(eval_rows),
        "accuracy_before": before,
        "accuracy_after": after,
        "gain_points": after - before,
        "train_metrics": result.metrics,
        "samples": [
            {"input": r["input"], "expected": r["output"], "before": b, "after": a}
            for r, b, a in list(zip(eval_rows, before_answers, after_answers, strict=True))[:3]
        ],
        "seconds_total": round(time.time() - started, 1),
        "run_dir": str(out),
    }
    write_json_atomic(out / "demo_results.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"held-out exact match, {summary['held_out_examples']} orders:",
        f"  before training: {summary['accuracy_before']:.0f}%",
        f"  after training:  {summary['accuracy_after']:.0f}%  (+{summary['gain_points']:.0f} points)",
        f"  trained {summary['train_metrics']['steps']} steps in {summary['train_metrics']['seconds']:.0f} s; "
        f"total {summary['seconds_total']:.0f} s",
    ]
    for sample in summary["samples"][:2]:
        lines += [
            f"  input:  {sample['input']}",
            f"    before: {sample['before'][:80]!r}",
            f"    after:  {sample['after']!r}",
        ]
    lines.append(f"adapter, run record and loss plot: {summary['run_dir']}")
    return "\n".join(lines)
