"""Check the memory model against measurements; writes benchmarks/memory.json and prints tables.

1. CPU: predicted vs tracked peak (baseline + step) of real 4-bit QLoRA training steps, for SmolLM2-135M
   (the demo model) and a randomly initialised Qwen2-like model of similar size, over micro-batch, sequence
   length and gradient checkpointing. Target: within +-15% each.
2. CPU budgets: plan() under --max-memory budgets, then run the planned step at full sequence length.
   The measured peak must stay under the budget and use >= 60% of it.
3. Published GPU points (/work/shared/data/published_memory_points.csv): the comparable rows only.

Run: .venv/bin/python scripts/benchmark_memory.py [--quick]   (~5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from qlora_lite.planner.memory import estimate_memory  # noqa: E402

MIB = 1024**2
GIB = 1024**3
PUBLISHED = Path("/work/shared/data/published_memory_points.csv")

# Shapes of the published models (from their config.json files), written inline: no network.
PUBLISHED_CONFIGS = {
    "llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True),
    "llama-3.2-3B": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True),
    "Llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "Meta-Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            tie_word_embeddings=False),
    "Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                            tie_word_embeddings=False),
    "gemma-2b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
                     tie_word_embeddings=True),
    "gemma-7b": dict(model_type="gemma", hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000,
                     tie_word_embeddings=True),
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       tie_word_embeddings=True),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       tie_word_embeddings=True),
    "phi-2": dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                  num_attention_heads=32, vocab_size=51200, tie_word_embeddings=False),
    "Phi-3-mini-4k-instruct": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                   vocab_size=32064, tie_word_embeddings=False),
    "TinyLlama-1.1B": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           tie_word_embeddings=False),
    "stablelm-base-alpha-3b": dict(model_type="gpt_neox", hidden_size=4096, intermediate_size=16384,
                                   num_hidden_layers=16, num_attention_heads=32, vocab_size=50688,
                                   tie_word_embeddings=False),
}  # fmt: skip
_QV = {"phi3": ["qkv_proj"], "gpt_neox": ["query_key_value"]}


def build_qwen2_like(folder: Path) -> Path:
    """A randomly initialised Qwen2-style model (~110M params: untied head, qkv biases) saved once."""
    if (folder / "config.json").is_file():
        return folder
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=32768, tie_word_embeddings=False, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def measure_step(path: str, *, micro_batch_size: int, seq_len: int, gradient_checkpointing: bool) -> dict:
    """Tracked peak of the second of two QLoRA steps (4-bit NF4 + double quant, fp32 compute, LoRA r16)."""
    from qlora_lite.model.loading import LoraSettings, attach_lora, load_base_model

    model = load_base_model(
        path, quantization="nf4", double_quant=True, compute_dtype="fp32", accelerator="cpu"
    )
    model = attach_lora(model, LoraSettings(r=16), gradient_checkpointing=gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (micro_batch_size, seq_len))
    return _second_of_two_steps(model, optimizer, lambda: model(input_ids=ids, labels=ids).loss)


def _second_of_two_steps(model, optimizer, loss_of_step) -> dict:  # noqa: ANN001
    """Run two optimizer steps; the tracked peak and seconds of the second (optimizer state present)."""
    from qlora_lite.planner.peak import track_peak

    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        with track_peak("cpu", [model, optimizer]) as peak:
            loss_of_step().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    del model, optimizer
    gc.collect()
    return {"measured_bytes": peak.peak_bytes, "baseline_bytes": peak.baseline_bytes, "step_seconds": seconds}


# The training fast paths ([13]): the chunked loss on supervised positions, packed rows (4 examples of a
# quarter row each, a third of each without loss), and lean bf16 precision (only on a CPU with bf16 matmuls:
# elsewhere bf16 is thousands of times slower and the row is skipped).
FAST_PATHS = {
    "chunked": dict(packed=False, compute_dtype="fp32", precision="upcast"),
    "packed+chunked": dict(packed=True, compute_dtype="fp32", precision="upcast"),
    "lean-bf16+packed+chunked": dict(packed=True, compute_dtype="bf16", precision="lean"),
}


def measure_fast_step(path: str, *, seq_len: int, packed: bool, compute_dtype: str, precision: str) -> dict:
    """Tracked peak of the second of two QLoRA steps through the trainer's own batching and chunked loss."""
    from qlora_lite.data.encoding import Example
    from qlora_lite.model.loading import LoraSettings, attach_lora, load_base_model
    from qlora_lite.training.batching import collate_rows
    from qlora_lite.training.loop import autocast
    from qlora_lite.training.loss import LossPath

    model = load_base_model(
        path, quantization="nf4", double_quant=True, compute_dtype=compute_dtype, accelerator="cpu"
    )
    model = attach_lora(model, LoraSettings(r=16), gradient_checkpointing=False, precision=precision)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    parts = 4 if packed else 1
    examples = []
    for _ in range(parts):
        ids = torch.randint(3, model.config.vocab_size, (seq_len // parts,)).tolist()
        cut = len(ids) // 3
        examples.append(Example(ids, [-100] * cut + ids[cut:]))
    batch = collate_rows([examples], 0, "cpu", packed=packed)
    denominator = int(len(batch.loss_targets))
    dtype = torch.bfloat16 if compute_dtype == "bf16" else None

    def loss_of_step() -> torch.Tensor:
        with autocast("cpu", dtype):
            return LossPath(chunked=True)(model, batch, denominator)

    return _second_of_two_steps(model, optimizer, loss_of_step)


def fast_path_rows(models: dict[str, str]) -> list[dict]:
    bf16_matmuls = torch.backends.cpu.get_cpu_capability() == "AVX512" and _has_cpu_flag("avx512_bf16")
    rows = []
    for name, path in models.items():
        for variant, knobs in FAST_PATHS.items():
            if knobs["compute_dtype"] == "bf16" and not bf16_matmuls:
                print(f"  {name:<22} {variant}: skipped (no bf16 matmuls on this CPU)")
                continue
            for seq in (256, 512):
                measured = measure_fast_step(path, seq_len=seq, **knobs)
                est = estimate_memory(path, compute_dtype=knobs["compute_dtype"], device="cpu", micro_batch_size=1,
                                      seq_len=seq, gradient_checkpointing=False, chunked_loss=True,
                                      precision=knobs["precision"])  # fmt: skip
                row = {"model": name, "path": variant, "micro_batch_size": 1, "seq_len": seq,
                       "predicted_bytes": est.peak_bytes, **measured}  # fmt: skip
                row["error_pct"] = round((est.peak_bytes / measured["measured_bytes"] - 1) * 100, 2)
                row["within_15pct"] = abs(row["error_pct"]) <= 15
                rows.append(row)
                print(f"  {name:<22} {variant:<25} seq {seq:<4} predicted {est.peak_bytes / MIB:7.1f} MiB measured "
                      f"{measured['measured_bytes'] / MIB:7.1f} MiB error {row['error_pct']:+6.1f}%", flush=True)  # fmt: skip
    return rows


def _has_cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def cpu_rows(models: dict[str, str], quick: bool) -> list[dict]:
    grid = [(1, 256, False), (2, 256, False), (1, 512, False), (1, 256, True), (4, 256, True), (2, 512, True)]
    if quick:
        grid = grid[:2] + grid[3:5]
    rows = []
    for name, path in models.items():
        for mb, seq, ckpt in grid:
            measured = measure_step(path, micro_batch_size=mb, seq_len=seq, gradient_checkpointing=ckpt)
            est = estimate_memory(path, compute_dtype="fp32", device="cpu", micro_batch_size=mb, seq_len=seq,
                                  gradient_checkpointing=ckpt)  # fmt: skip
            row = {"model": name, "micro_batch_size": mb, "seq_len": seq, "gradient_checkpointing": ckpt,
                   "predicted_bytes": est.peak_bytes, **measured}  # fmt: skip
            row["error_pct"] = round((est.peak_bytes / measured["measured_bytes"] - 1) * 100, 2)
            row["within_15pct"] = abs(row["error_pct"]) <= 15
            rows.append(row)
            print(f"  {name:<22} mb {mb} seq {seq:<4} ckpt {'on ' if ckpt else 'off'} predicted "
                  f"{est.peak_bytes / MIB:7.1f} MiB measured {measured['measured_bytes'] / MIB:7.1f} MiB "
                  f"error {row['error_pct']:+6.1f}%", flush=True)  # fmt: skip
    return rows


def budget_rows(path: str, budgets_mib: list[int]) -> list[dict]:
    from qlora_lite.planner.planning import plan

    rows = []
    for budget_mib in budgets_mib:
        budget = budget_mib * MIB
        p = plan(path, hardware="cpu", max_memory=budget, max_seq_length=256, effective_batch_size=8)
        row = {"budget_bytes": budget, "fits": p.fits, "micro_batch_size": p.micro_batch_size,
               "gradient_checkpointing": p.gradient_checkpointing, "max_seq_length": p.max_seq_length,
               "predicted_bytes": p.peak_memory_bytes}  # fmt: skip
        if p.fits:
            measured = measure_step(path, micro_batch_size=p.micro_batch_size, seq_len=p.max_seq_length,
                                    gradient_checkpointing=p.gradient_checkpointing)  # fmt: skip
            row.update(measured)
            row["used_pct"] = round(measured["measured_bytes"] / budget * 100, 1)
            row["under_budget"] = measured["measured_bytes"] <= budget
            row["uses_60pct"] = row["used_pct"] >= 60
        rows.append(row)
        print(f"  budget {budget_mib:5d} MiB -> mb {p.micro_batch_size} ckpt {p.gradient_checkpointing!s:<5} "
              f"predicted {p.peak_memory_bytes / MIB:7.1f} MiB measured "
              f"{row.get('measured_bytes', 0) / MIB:7.1f} MiB = {row.get('used_pct', 0)}% of budget", flush=True)  # fmt: skip
    return rows


def published_rows() -> list[dict]:
    """litgpt rows: one framework, peak = torch.cuda.max_memory_allocated, no offloading, no CCE."""
    rows = []
    if not PUBLISHED.is_file():
        return rows
    for r in csv.DictReader(PUBLISHED.open()):
        if r["framework"] != "litgpt" or r["model"] not in PUBLISHED_CONFIGS or not r["peak_GiB"]:
            continue
        cfg = PUBLISHED_CONFIGS[r["model"]]
        targets = (
            "all-linear" if "mlp" in r["lora_targets"] else _QV.get(cfg["model_type"], ["q_proj", "v_proj"])
        )
        quantized = r["method"] == "QLoRA"
        est = estimate_memory(
            cfg, quantization="nf4" if quantized else "none", double_quant=False, compute_dtype="bf16",
            micro_batch_size=int(r["micro_batch"]), seq_len=512, gradient_checkpointing=False,
            optimizer="paged_adamw_32bit" if quantized else "adamw_torch", lora_r=int(r["lora_r"]),
            lora_target_modules=targets, device="cuda",
        )  # fmt: skip
        allocated = (
            est.peak_bytes - est.breakdown["cuda_context"]
        )  # max_memory_allocated excludes the context
        published = float(r["peak_GiB"]) * GIB
        rows.append({"id": r["id"], "model": r["model"], "method": r["method"], "micro_batch_size": int(r["micro_batch"]),
                     "published_bytes": int(published), "predicted_bytes": allocated,
                     "error_pct": round((allocated / published - 1) * 100, 1)})  # fmt: skip
        print(f"  {r['id']} {r['model']:<24} {r['method']:<9} mb {r['micro_batch']} published {float(r['peak_GiB']):6.2f}"
              f" GiB predicted {allocated / GIB:6.2f} GiB error {rows[-1]['error_pct']:+6.1f}%")  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer CPU configurations")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "memory.json"))
    parser.add_argument(
        "--fast-paths-only", action="store_true", help="measure only the fast paths; update them in --output"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    from qlora_lite.demo.model import ensure_demo_model

    cache = Path(os.environ.get("QLORA_LITE_CACHE", Path.home() / ".cache" / "qlora_lite"))
    models = {
        "SmolLM2-135M-Instruct": str(ensure_demo_model()),
        "qwen2-like-110M (random)": str(build_qwen2_like(cache / "bench-qwen2-like")),
    }
    start = time.perf_counter()
    out = Path(args.output)
    if args.fast_paths_only:
        print("4. CPU: the fast paths (chunked loss, packed rows, lean bf16), predicted vs measured")
        fast = fast_path_rows(models)
        saved = json.loads(out.read_text())
        saved["fast_paths"] = fast
        saved["summary"]["fast_paths_max_abs_error_pct"] = max(abs(r["error_pct"]) for r in fast)
        saved["summary"]["fast_paths_all_within_15pct"] = all(r["within_15pct"] for r in fast)
        out.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    print("1. CPU: predicted vs measured peak (4-bit NF4, fp32 compute, LoRA r16 all-linear)")
    cpu = cpu_rows(models, args.quick)
    print("2. CPU: planned under a memory budget, then measured")
    budgets = budget_rows(
        models["SmolLM2-135M-Instruct"], [450, 650, 900, 1300] if not args.quick else [450, 900]
    )
    print("3. Published GPU points (litgpt, max_memory_allocated)")
    published = published_rows()
    print("4. CPU: the fast paths (chunked loss, packed rows, lean bf16), predicted vs measured")
    fast = fast_path_rows(models)
    errors = [abs(r["error_pct"]) for r in cpu]
    summary = {
        "cpu_configs": len(cpu),
        "cpu_max_abs_error_pct": max(errors),
        "cpu_all_within_15pct": all(r["within_15pct"] for r in cpu),
        "budgets_all_under": all(r.get("under_budget", False) for r in budgets),
        "budgets_all_use_60pct": all(r.get("uses_60pct", False) for r in budgets),
        "published_median_error_pct": sorted(r["error_pct"] for r in published)[len(published) // 2] if published else None,
        "fast_paths_max_abs_error_pct": max(abs(r["error_pct"]) for r in fast),
        "fast_paths_all_within_15pct": all(r["within_15pct"] for r in fast),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    everything = {
        "summary": summary,
        "cpu": cpu,
        "budgets": budgets,
        "published": published,
        "fast_paths": fast,
    }
    out.write_text(json.dumps(everything, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
