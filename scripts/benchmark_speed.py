"""TRL's default SFT notebook recipe vs qlora_lite's own plan, side by side: writes benchmarks/speed.json.

Same base model (SmolLM2-135M-Instruct, 4-bit NF4 + double quant, fp32 compute on CPU / bf16 on a bf16 GPU),
same data, same number of optimizer steps and effective batch (8), same LoRA (r 16, alpha 32, dropout 0.05,
all linear layers), same learning rate. The data: one question per documented public function or class of 36
standard-library modules, answered with its docstring (481 chat examples, real text shipped with Python,
long-tailed: median ~73 tokens, 99th percentile ~540), truncated at 512 tokens for both.

- TRL: `SFTTrainer` with the notebook defaults: micro-batch 2, accumulation 4, max_length 512, gradient
  checkpointing on, peft's k-bit preparation; prompt-completion data (loss on the answers, as qlora_lite).
- qlora_lite: `qlora_lite.train` with the same fixed settings and a memory budget equal to what TRL's run
  used, the rest left to the planner (packing, chunked loss, checkpointing, micro-batch).

Measured per recipe, each in its own process: non-padding tokens per second over the optimizer steps (TRL: the
time between its step callbacks, which leaves out its data loading and logging; qlora_lite: its step
timings, which include collation), and the process's peak resident memory while training (VmHWM, reset when
training starts, after the model is loaded). Ratios are qlora_lite / TRL from the same run.

Run: .venv/bin/python scripts/benchmark_speed.py [--steps 4]   (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

MODULES = (
    "json os.path collections itertools functools textwrap string re shutil pathlib statistics random math heapq "
    "bisect csv datetime fractions decimal difflib fnmatch glob gzip hashlib html ipaddress operator pprint secrets "
    "shlex tempfile urllib.parse uuid zipfile base64 calendar"
).split()
LORA = dict(r=16, alpha=32, dropout=0.05)
MAX_LENGTH = 512
EFFECTIVE_BATCH = 8
LEARNING_RATE = 2e-4
MIB = 1024**2


def docstring_chats() -> list[dict]:
    """Questions about standard-library functions and classes, answered with their docstrings."""
    rows = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (
                inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)
            ):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 20:
                question = f"What does {module_name}.{name} do in Python?"
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": doc},
                        ]
                    }
                )
    return rows


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def reset_peak() -> None:
    """Start counting the process's peak resident memory from now (Linux: clear_refs 5 resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------------------------- workers


def run_trl(model_path: str, rows: list[dict], steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
        dtype=dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])

    class Timer(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            reset_peak()

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds += time.perf_counter() - self.start

    timer = Timer()
    args = SFTConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_length=MAX_LENGTH,
        gradient_checkpointing=True,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[timer],
    )  # fmt: skip
    counts = {"tokens": 0, "padded": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts["tokens"] += int(batch["attention_mask"].sum())
        counts["padded"] += int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    rss_start = _status("VmRSS")
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "recipe": "TRL SFTTrainer, notebook defaults",
        "settings": {
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 4,
            "max_length": MAX_LENGTH,
            "gradient_checkpointing": True,
            "quantization": "nf4 + double quant",
            "compute_dtype": str(dtype).removeprefix("torch."),
            "precision": "upcast (peft)",
            "packing": False,
        },  # fmt: skip
        "steps": steps,
        "non_padding_tokens": counts["tokens"],
        "padded_tokens": counts["padded"],
        "step_seconds": round(timer.seconds, 2),
        "tokens_per_second": round(counts["tokens"] / timer.seconds, 2),
        "peak_rss_bytes": _status("VmHWM"),
        "rss_at_train_start_bytes": rss_start,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "losses": losses,
    }


def run_qlora(model_path: str, data_file: Path, steps: int, out: Path, peak_to_match: int) -> dict:
    import torch

    import qlora_lite

    class Peak:
        def on_model_ready(self, model):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            reset_peak()
            self.rss_start = _status("VmRSS")

    # The planner budgets tensors; what the process holds besides them (libraries, heap) is already resident.
    budget = int((peak_to_match - _status("VmRSS")) * 0.97) if peak_to_match else None
    peak = Peak()
    result = qlora_lite.train(
        model_path, str(data_file), str(out / "qlora"), max_steps=steps, effective_batch_size=EFFECTIVE_BATCH,
        max_seq_length=MAX_LENGTH, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        learning_rate=LEARNING_RATE, eval_fraction=0.0, sample_generations=0, progress=False,
        max_memory=budget, callbacks=[peak], overwrite=True,
    )  # fmt: skip
    plan = result.plan
    history = json.loads((out / "qlora" / "run_record.json").read_text()).get("metrics", {})
    return {
        "recipe": "qlora_lite, its own plan",
        "settings": {
            k: getattr(plan, k)
            for k in (
                "micro_batch_size",
                "gradient_accumulation_steps",
                "max_seq_length",
                "gradient_checkpointing",
                "packing",
                "chunked_loss",
                "precision",
                "compute_dtype",
                "quantization",
                "optimizer",
            )
        },  # fmt: skip
        "memory_budget_bytes": budget,
        "planned_peak_bytes": plan.peak_memory_bytes,
        "steps": result.metrics["steps"],
        "non_padding_tokens": result.metrics["tokens_seen"],
        "step_seconds": round(result.metrics["tokens_seen"] / result.metrics["tokens_per_second"], 2),
        "tokens_per_second": result.metrics["tokens_per_second"],
        "peak_rss_bytes": _status("VmHWM"),
        "rss_at_train_start_bytes": peak.rss_start,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "train_loss": history.get("train_loss"),
        "explain": plan.explain(),
    }


# ------------------------------------------------------------------------------------------------ main


def _worker(args: argparse.Namespace) -> int:
    from qlora_lite.demo.model import ensure_demo_model

    model_path = str(ensure_demo_model())
    out = Path(args.workdir)
    started = load_average()
    if args.worker == "trl":
        rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
        result = run_trl(model_path, rows, args.steps, out)
    else:
        result = run_qlora(model_path, out / "data.jsonl", args.steps, out, args.peak_to_match)
    result["load_average"] = [started, load_average()]
    (out / f"{args.worker}.json").write_text(json.dumps(result, indent=2))
    return 0


def _spawn(worker: str, args: argparse.Namespace, workdir: Path, peak: int = 0) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--workdir",
        str(workdir),
        "--steps",
        str(args.steps),
    ]
    command += ["--peak-to-match", str(peak)]
    print(f"running {worker} ...", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads((workdir / f"{worker}.json").read_text())
    print(
        f"  {worker}: {result['tokens_per_second']:.1f} non-padding tokens/s, peak RSS "
        f"{result['peak_rss_bytes'] / MIB:.0f} MiB ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each recipe")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "speed.json"))
    parser.add_argument("--worker", choices=["trl", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--peak-to-match", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    import torch

    rows = docstring_chats()
    with tempfile.TemporaryDirectory(prefix="qlora-speed-") as tmp:
        workdir = Path(tmp)
        (workdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        trl = _spawn("trl", args, workdir)
        ours = _spawn("qlora", args, workdir, peak=trl["peak_rss_bytes"])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ratios = {
        "tokens_per_second": round(ours["tokens_per_second"] / trl["tokens_per_second"], 2),
        "peak_rss": round(ours["peak_rss_bytes"] / trl["peak_rss_bytes"], 3),
    }
    target = 2.0 if gpu else 3.0
    summary = {
        "device": gpu or "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine_shared": True,
        "note": "a 2-core machine shared with other jobs (load averages recorded per recipe): compare the "
        "ratios, measured in one run, not the absolute numbers",
        "data": {"examples": len(rows), "source": "Python standard-library docstrings (36 modules)"},
        "ratios": ratios,
        "target": {"tokens_per_second_ratio": target, "peak_memory_ratio_at_most": 1.0},
        "meets_target": ratios["tokens_per_second"] >= target and ratios["peak_rss"] <= 1.0,
        "torch": torch.__version__,
    }
    report = {"summary": summary, "trl": trl, "qlora_lite": ours}
    key = "gpu" if gpu else "cpu"
    path = Path(args.output)
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing[key] = report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
