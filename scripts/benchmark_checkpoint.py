"""What checkpointing costs: the same SmolLM2-135M QLoRA run without checkpoints, with the default time-based
interval, and with a checkpoint after every step (the worst case), plus a durable copy to a second folder.

Writes benchmarks/checkpoint.json. Ratios are against the no-checkpoint run in the same process.
    .venv/bin/python scripts/benchmark_checkpoint.py [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import qlora_lite
from qlora_lite.demo.task import make_dataset


def run(model: str, rows: list[dict], out: Path, **settings) -> dict:
    started = time.perf_counter()
    result = qlora_lite.train(model, rows, str(out), progress=False, eval_fraction=0.0, **settings)
    wall = time.perf_counter() - started
    step_seconds = sum(r["seconds"] for r in json.loads(result.run_record.read_text())["history"])
    return {
        "wall_seconds": round(wall, 2),
        "step_seconds": round(step_seconds, 2),
        "checkpoint_seconds": result.metrics["checkpoint_seconds"],
        "checkpoint_overhead": result.metrics["checkpoint_overhead"],
        "checkpoints_saved": result.metrics["checkpoints_saved"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--output", default="benchmarks/checkpoint.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = str(qlora_lite.ensure_demo_model())
    rows, _ = make_dataset(n_train=8 * args.steps, n_eval=0)
    common = dict(max_steps=args.steps, effective_batch_size=8, micro_batch_size=8, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = {
            "no checkpoints (one at the end)": dict(save_every_minutes=1e6),
            "default interval (plan)": {},
            "every step + durable copy": dict(save_every_steps=1, checkpoint_dir=str(tmp / "durable")),
        }
        results = {
            name: run(model, rows, tmp / f"run{i}", **common, **extra)
            for i, (name, extra) in enumerate(cases.items())
        }
    base = results["no checkpoints (one at the end)"]["step_seconds"]
    for row in results.values():
        row["step_time_ratio_vs_none"] = round(row["step_seconds"] / base, 4)
    report = {
        "model": "SmolLM2-135M-Instruct, 4-bit NF4, LoRA r16 all-linear, CPU",
        "steps": args.steps,
        "cases": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in results.items():
        print(
            f"{name:<34} checkpoints {row['checkpoints_saved']:>2}  saving {row['checkpoint_seconds']:>6.2f} s"
            f"  = {100 * row['checkpoint_overhead']:.2f}% of training time"
        )


if __name__ == "__main__":
    main()
