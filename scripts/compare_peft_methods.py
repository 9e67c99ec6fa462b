"""Every PEFT method on the demo task (SmolLM2-135M 4-bit, order text -> JSON) and on the intent classifier
(all-MiniLM-L6-v2 4-bit), with the same budget of steps: held-out accuracy, trainable parameters, measured
peak memory of training (live tensors on CPU / max allocated on CUDA) and seconds per step.

    python scripts/compare_peft_methods.py [--demo-steps 16] [--classify-steps 30] [--only dora,ia3]

Writes benchmarks/peft_methods.json (after every method, so a partial run keeps what it measured) and
docs/peft_methods.md (one table). The budget is small on purpose (a shared 2-core CPU): it ranks what each
method learns in the same few steps, not where each ends up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_lite.planner.peak import track_peak  # noqa: E402

# Method -> (settings, learning rate). LoRA-family rates follow the demo; IA3 and the prompt methods train a
# few thousand numbers and need the larger rates their papers/PEFT examples use.
METHODS = {
    "lora": ({}, 3e-4),
    "dora": ({"lora_method": "dora"}, 3e-4),
    "rslora": ({"rslora": True}, 3e-4),
    "lora_plus": ({"lora_plus_ratio": 16.0}, 3e-4),
    "pissa": ({"init_lora_weights": "pissa"}, 3e-4),
    "olora": ({"init_lora_weights": "olora"}, 3e-4),
    "loftq": ({"init_lora_weights": "loftq"}, 3e-4),
    "loftq_5iter": ({"init_lora_weights": "loftq", "loftq_iter": 5}, 3e-4),
    "lora_attention": ({"lora_target_modules": "attention"}, 3e-4),
    "ia3": ({"peft_method": "ia3"}, 3e-3),
    "prompt_tuning": ({"peft_method": "prompt_tuning", "num_virtual_tokens": 16}, 3e-2),
    "prefix_tuning": ({"peft_method": "prefix_tuning", "num_virtual_tokens": 16}, 3e-3),
}


class PeakOfTraining:
    """Tracks peak memory from the moment the model is ready through the probe and the first step
    (optimizer states exist from step 1 on). Only those: the CPU tracker sees every op in Python and would
    make a whole run several times slower."""

    def __init__(self, device: str, steps: int = 2) -> None:
        self.device, self.steps, self.result, self._cm = device, steps, None, None

    def on_model_ready(self, model) -> None:
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._cm = track_peak(self.device, model)
        self.result = self._cm.__enter__()

    def on_step_end(self, state) -> None:
        if state.step >= self.steps:
            self.close()

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


def _step_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows if "seconds" in r][1:]  # the first step warms caches up
    return round(statistics.median(seconds), 3) if seconds else float("nan")


def run_demo_method(name: str, steps: int, work: Path, device: str) -> dict:
    from qlora_lite.demo.model import ensure_demo_model
    from qlora_lite.demo.run import accuracy
    from qlora_lite.demo.task import make_dataset
    from qlora_lite.inference.generation import Generator
    from qlora_lite.training.api import train

    settings, lr = METHODS[name]
    model_dir = ensure_demo_model()
    train_rows, eval_rows = make_dataset(n_train=240, n_eval=8)
    data = work / "demo-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    peak = PeakOfTraining(device, steps=1)
    out = work / f"demo-{name}"
    started = time.time()
    try:
        result = train(str(model_dir), str(data), str(out), max_steps=steps, eval_every=steps, effective_batch_size=8,
                       learning_rate=lr, lora_r=16, eval_fraction=0.05, overwrite=True, progress=False,
                       callbacks=[peak], **settings)  # fmt: skip
    finally:
        peak.close()
    train_seconds = time.time() - started
    after, answers = accuracy(Generator(result.adapter_dir), eval_rows)
    return {
        "task": "demo", "method": name, "settings": settings, "learning_rate": lr, "steps": steps,
        "held_out_accuracy": after, "held_out_examples": len(eval_rows),
        "trainable_params": peak.trainable, "peak_memory_bytes": peak.result.peak_bytes,
        "predicted_peak_bytes": result.plan.peak_memory_bytes if hasattr(result.plan, "peak_memory_bytes") else None,
        "seconds_per_step": _step_seconds(out), "train_seconds": round(train_seconds, 1),
        "final_train_loss": result.metrics.get("train_loss"), "sample_answer": answers[0][:120],
    }  # fmt: skip


def run_classify_method(name: str, steps: int, work: Path, device: str) -> dict:
    from qlora_lite.demo.classify import make_intent_dataset, minilm_path
    from qlora_lite.training.api import train_classifier

    settings, lr = METHODS[name]
    train_rows, held_rows = make_intent_dataset()
    for split, rows in (("train", train_rows), ("held", held_rows)):
        (work / f"intent-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peak = PeakOfTraining(device, steps=1)
    out = work / f"classify-{name}"
    started = time.time()
    try:
        result = train_classifier(str(minilm_path()), str(work / "intent-train.jsonl"), str(out),
                                  eval_data=str(work / "intent-held.jsonl"), max_steps=steps, eval_every=steps,
                                  effective_batch_size=16, learning_rate=lr * 10 if name in ("ia3",) else lr * 3,
                                  lora_r=16, overwrite=True, progress=False, seed=0, callbacks=[peak],
                                  **settings)  # fmt: skip
    finally:
        peak.close()
    evaluation = result.evaluation or {}
    return {
        "task": "classify", "method": name, "settings": settings, "steps": steps,
        "held_out_accuracy": 100.0 * (evaluation.get("accuracy") or 0.0), "held_out_examples": len(held_rows),
        "trainable_params": peak.trainable, "peak_memory_bytes": peak.result.peak_bytes,
        "seconds_per_step": _step_seconds(out), "train_seconds": round(time.time() - started, 1),
        "final_train_loss": result.metrics.get("train_loss"),
    }  # fmt: skip


def write_table(results: dict, path: Path) -> None:
    lines = [
        "Generated by `scripts/compare_peft_methods.py` from `benchmarks/peft_methods.json`. "
        + results["note"],
        "",
        "| task | method | held-out accuracy | trainable params | peak memory (MiB) | s / step | vs LoRA s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in ("demo", "classify"):
        rows = [r for r in results["runs"] if r["task"] == task]
        lora = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {task} | {r['method']} | failed: {r['error'][:80]} | | | | |")
                continue
            ratio = f"{r['seconds_per_step'] / lora['seconds_per_step']:.2f}x" if lora else ""
            lines.append(
                f"| {task} | {r['method']} | {r['held_out_accuracy']:.0f}% of {r['held_out_examples']} | "
                f"{r['trainable_params']:,} | {r['peak_memory_bytes'] / 2**20:.0f} | {r['seconds_per_step']:.2f} | {ratio} |"
            )
    lines += ["", results["reading"]]
    # Only the part between the markers is generated; the prose around it is kept.
    start, end = "<!-- table: written by scripts/compare_peft_methods.py -->", "<!-- /table -->"
    text = path.read_text() if path.is_file() else f"# PEFT methods\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


def _summarize(results: dict) -> None:
    """What is missing, from the rows themselves (a partial or repeated run must not keep stale lists)."""
    done = {(r["task"], r["method"]) for r in results["runs"] if "error" not in r}
    tasks = ("demo", "classify")
    results["methods_not_run"] = sorted({m for m in METHODS for t in tasks if (t, m) not in done})
    results["tasks_not_run"] = [t for t in tasks if not any(task == t for task, _ in done)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-steps", type=int, default=8)
    parser.add_argument("--classify-steps", type=int, default=20)
    parser.add_argument("--only", default=None, help="comma-separated methods")
    parser.add_argument("--tasks", default="demo,classify")
    parser.add_argument("--work", default="runs/peft-methods")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "peft_methods.json"))
    parser.add_argument("--table-only", action="store_true", help="rewrite the docs table from the JSON")
    args = parser.parse_args()
    if args.table_only:
        write_table(json.loads(Path(args.out).read_text()), ROOT / "docs" / "peft_methods.md")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(METHODS)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    results.update(
        device=device, cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine(),
        torch=torch.__version__, demo_steps=args.demo_steps, classify_steps=args.classify_steps,
        note=(f"Budget: {args.demo_steps} steps x 8 examples on the demo, {args.classify_steps} steps x 16 on "
              "the classifier, per method, on a 2-core CPU: seconds are comparable within a run only, and "
              "accuracies rank what each method learns in a few steps, not where each ends up."),
        reading=("Peak memory is the peak of live tensors (CPU) from model ready through the probe and the "
                 "first optimizer step. LoRA-family rates 3e-4 (demo), IA3 3e-3, prompt tuning 3e-2, prefix "
                 "tuning 3e-3; classifier rates 3x those (IA3 10x)."),
    )  # fmt: skip
    runners = {"demo": run_demo_method, "classify": run_classify_method}
    for task in args.tasks.split(","):
        for name in names:
            results["runs"] = [r for r in results["runs"] if (r["task"], r["method"]) != (task, name)]
            print(f"== {task} / {name}", flush=True)
            try:
                row = runners[task](
                    name, args.demo_steps if task == "demo" else args.classify_steps, work, device
                )
            except Exception as exc:  # noqa: BLE001 - one method failing is a result too
                row = {"task": task, "method": name, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(row), flush=True)
            results["runs"].append(row)
            _summarize(results)
            out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            write_table(results, ROOT / "docs" / "peft_methods.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
