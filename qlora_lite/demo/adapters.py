"""Two real adapters on one loaded base: orders -> JSON and dates -> ISO, on SmolLM2-135M-Instruct in 4-bit.

Trains (or reuses) one run per task, loads both into one `AdapterSet`, and measures: each adapter's held-out
exact match on its own task through the one loaded base, in batches where orders and dates rows sit side by
side, each through its own adapter (and the base's score), a router built from the runs' own training prompts
(held-out routing accuracy, off-topic requests expected at the base), and the time to switch vs to reload.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from qlora_lite.data.formats import prompt_sample
from qlora_lite.demo import dates, task
from qlora_lite.demo.model import ensure_demo_model
from qlora_lite.inference.adapters import AdapterSet
from qlora_lite.inference.generation import Generator
from qlora_lite.inference.router import Router, training_sample
from qlora_lite.training.api import train

log = logging.getLogger(__name__)

TASKS = {"orders": task, "dates": dates}
OFF_TOPIC = [
    "Write a haiku about autumn leaves.",
    "What is the capital of Japan?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Explain photosynthesis in one sentence.",
    "Tell me a joke about computers.",
]
MAX_NEW_TOKENS = 40  # the longest expected answer (an order as JSON) is ~35 tokens


def _train(
    name: str, out: Path, model_dir: str, max_steps: int, lr: float, n_eval: int, progress: bool
) -> tuple:
    module = TASKS[name]
    train_rows, eval_rows = module.make_dataset(n_train=480, n_eval=n_eval)
    data = out / f"{name}-data.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    settings = dict(
        max_steps=max_steps, effective_batch_size=8, learning_rate=lr, lora_r=16, eval_fraction=0.05
    )
    return train(model_dir, str(data), str(out / name), progress=progress, **settings), eval_rows


def _training_facts(run: Path) -> dict[str, Any]:
    """Steps, time and losses of a finished run, or of a checkpoint folder (`loop.json`) given for reuse."""
    if (run / "run_record.json").is_file():
        record = json.loads((run / "run_record.json").read_text())
        keys = ("steps", "seconds", "train_loss", "eval_loss", "tokens_per_second")
        return {
            **{k: record["metrics"].get(k) for k in keys},
            "learning_rate": record["hyperparameters"].get("learning_rate"),
            "effective_batch_size": record["plan"].get("effective_batch_size"),
            "run": str(run),
        }
    loop = json.loads((run / "loop.json").read_text())
    history = loop.get("history") or [{}]
    return {
        "steps": loop["step"],
        "seconds": round(sum(r.get("seconds", 0) for r in history), 1),
        "train_loss": history[-1].get("loss"),
        "eval_loss": (loop.get("eval_history") or [{}])[-1].get("eval_loss"),
        "learning_rate": history[0].get("learning_rate"),
        "run": f"{run} (a checkpoint of an unfinished run)",
    }


def _router_sample(name: str, run: Path) -> list[str]:
    """The training prompts the run kept for routing; for a reused checkpoint, the same sample made afresh."""
    if (run / "run_record.json").is_file():
        return training_sample(run)
    rows = TASKS[name].make_dataset(n_train=480, n_eval=1)[0]
    return prompt_sample([[{"role": "user", "content": TASKS[name].prompt_for(r)}] for r in rows])


def _batched(aset: AdapterSet, prompts: list[str], names: list[str | None], size: int = 8) -> list:
    out = []
    for i in range(0, len(prompts), size):
        out += aset.generate(prompts[i : i + size], names[i : i + size], max_new_tokens=MAX_NEW_TOKENS)
    return out


def _switch_vs_reload(aset: AdapterSet, runs: dict[str, Path], repeats: int = 2) -> dict[str, float]:
    """Seconds to answer with the other adapter: switching in the loaded set vs loading base + adapter anew."""
    prompt = dates.prompt_for(dates.make_dataset(1, 1, seed=9)[1][0])
    aset.generate([prompt], "orders", max_new_tokens=1)  # warm
    switch = []
    for _ in range(repeats):
        for name in ("dates", "orders"):
            started = time.perf_counter()
            aset.generate([prompt], name, max_new_tokens=1)
            switch.append(time.perf_counter() - started)
    reload = []
    for _ in range(repeats):
        started = time.perf_counter()
        Generator(runs["orders"]).complete(
            [prompt], max_new_tokens=1
        )  # a run folder: its record names the base
        reload.append(time.perf_counter() - started)
    started = time.perf_counter()
    aset.load("orders-again", str(runs["orders"]))
    load_adapter = time.perf_counter() - started
    aset.unload("orders-again")
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "switch_seconds_median": median(switch),
        "reload_seconds_median": median(reload),
        "reload_over_switch": median(reload) / median(switch),
        "load_adapter_into_set_seconds": load_adapter,
        "what": "one-token answer with the other adapter: switching in the loaded AdapterSet (per-row PEFT "
        "adapter_names) vs a fresh Generator (load the 4-bit base + adapter, then answer)",
    }


def run_adapters_demo(
    output_dir: str = "runs/adapters-demo",
    *,
    max_steps: int = 60,
    learning_rate: float = 3e-4,
    n_eval: int = 16,
    progress: bool = True,
    reuse: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`reuse`: {task: run folder} already trained on that task (e.g. {"orders": "runs/demo"} from
    `qlora-lite demo`, the same data and settings), so only the other task trains."""
    started = time.time()
    model_dir = str(ensure_demo_model())
    out = Path(output_dir)
    runs, held_out = {}, {}
    for name in TASKS:
        if reuse and name in reuse:
            runs[name] = Path(reuse[name])
            held_out[name] = TASKS[name].make_dataset(n_train=480, n_eval=n_eval)[1]
            continue
        result, held_out[name] = _train(name, out, model_dir, max_steps, learning_rate, n_eval, progress)
        runs[name] = Path(result.adapter_dir)

    aset = AdapterSet(adapters={name: str(path) for name, path in runs.items()})
    # Each adapter on its own task through the one loaded base, in mixed batches: orders rows through the
    # orders adapter and dates rows through the dates adapter, side by side in the same batch.
    mixed_rows = [(n, r) for pair in zip(held_out["orders"], held_out["dates"], strict=True) for n, r in
                  zip(TASKS, pair, strict=True)]  # fmt: skip
    answers = _batched(aset, [TASKS[n].prompt_for(r) for n, r in mixed_rows], [n for n, _ in mixed_rows])
    own = {
        name: 100.0 * sum(TASKS[n].is_correct(a.text, r) for a, (n, r) in zip(answers, mixed_rows, strict=True)
                          if n == name) / len(held_out[name])
        for name in TASKS
    }  # fmt: skip
    base_answers = _batched(aset, [TASKS[n].prompt_for(r) for n, r in mixed_rows], [None] * len(mixed_rows))
    base = {
        name: 100.0 * sum(TASKS[n].is_correct(a.text, r) for a, (n, r) in
                          zip(base_answers, mixed_rows, strict=True) if n == name) / len(held_out[name])
        for name in TASKS
    }  # fmt: skip

    router = Router.from_samples({name: _router_sample(name, path) for name, path in runs.items()})
    router.save(out / "router.json")
    routed = [(TASKS[n].prompt_for(r), n) for n in TASKS for r in held_out[n]]
    routing = router.evaluate(routed + [(t, None) for t in OFF_TOPIC])

    summary = {
        "model": model_dir,
        "quantization": aset.quantization,
        "held_out_per_task": n_eval,
        "train": {n: _training_facts(runs[n]) for n in runs},
        "accuracy_own_adapter_in_mixed_batches": own,
        "accuracy_base": base,
        "sample_answers": [
            {"task": n, "adapter": a.text, "base": b.text, "expected": r["output"]}
            for a, b, (n, r) in list(zip(answers, base_answers, mixed_rows, strict=True))[:4]
        ],
        "router": {
            "kind": router.kind,
            "held_out_accuracy": routing["accuracy"],
            "n": routing["n"],
            "off_topic_prompts": len(OFF_TOPIC),
            "confusion": routing["confusion"],
        },
        "timing": _switch_vs_reload(aset, runs),
        "seconds_total": round(time.time() - started, 1),
        "runs": {k: str(v) for k, v in runs.items()},
    }
    (out / "adapters_demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_adapters_summary(s: dict[str, Any]) -> str:
    t = s["timing"]
    lines = [
        f"two adapters on one loaded base ({s['quantization']}), {s['held_out_per_task']} held-out per task:"
    ]
    for name in TASKS:
        lines.append(
            f"  {name:7} own adapter (mixed batches) {s['accuracy_own_adapter_in_mixed_batches'][name]:5.1f}%"
            f"  base {s['accuracy_base'][name]:5.1f}%"
        )
    lines += [
        f"  router held-out accuracy {100 * s['router']['held_out_accuracy']:.1f}% "
        f"({s['router']['n']} prompts incl. {s['router']['off_topic_prompts']} off-topic -> base)",
        f"  switch {t['switch_seconds_median']:.3f} s vs reload {t['reload_seconds_median']:.2f} s "
        f"({t['reload_over_switch']:.0f}x); loading one more adapter into the set "
        f"{t['load_adapter_into_set_seconds']:.2f} s",
    ]
    return "\n".join(lines)
