"""GPU check of the memory model: predicted vs measured peak (torch.cuda.max_memory_allocated) and tokens/s.

Builds randomly initialised models with real architectures' shapes (written inline, no network), loads them
through qlora_lite's own loader (4-bit NF4 + double quant, LoRA r16 all-linear, bf16/fp16 autocast as the
trainer does) and runs three QLoRA steps per case; the third is measured. About 4-6 minutes on one GPU.

    python scripts/gpu_check.py [--output benchmarks/gpu_check.json]
    python scripts/gpu_check.py --multi-gpu [--output benchmarks/gpu_check_multi.json]

--multi-gpu (2+ GPUs, about 2 minutes): the same 4-bit run as 1 process and as 2 nccl ranks under torchrun
(fp32 compute, LoRA dropout 0): per-step losses and the adapter must agree (docs/distributed.md).
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shapes from the public config.json files. Mistral-7B keeps its layer shape but only 8 of its 32 layers,
# so that the random model is quick to build and save; the estimate uses the same 8-layer config.
CONFIGS = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=500000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0),
    "mistral-7b-8layers": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
                               vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    model: str
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool


CASES = (
    Case("llama-3.2-1b", 4, 1024, False),
    Case("llama-3.2-1b", 8, 1024, True),
    Case("qwen2.5-1.5b", 4, 2048, True),
    Case("mistral-7b-8layers", 2, 2048, False),
)


def predict(case: Case, compute_dtype: str) -> dict:
    """The estimate for a case, as allocated bytes (the CUDA context is not in max_memory_allocated)."""
    from qlora_lite.planner.memory import estimate_memory

    est = estimate_memory(
        CONFIGS[case.model], quantization="nf4", double_quant=True, compute_dtype=compute_dtype,
        micro_batch_size=case.micro_batch_size, seq_len=case.seq_len,
        gradient_checkpointing=case.gradient_checkpointing, optimizer="adamw_torch", device="cuda",
    )  # fmt: skip
    return {"predicted_bytes": est.peak_bytes - est.breakdown["cuda_context"], "breakdown": est.breakdown}


def compare(predicted: int, measured: int) -> dict:
    return {
        "error_pct": round((predicted / measured - 1) * 100, 1),
        "within_15pct": abs(predicted / measured - 1) <= 0.15,
    }


def build_model(name: str, folder: Path) -> Path:
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def measure(case: Case, path: Path, compute_dtype: str, steps: int = 3) -> dict:
    import torch

    from qlora_lite.model.loading import LoraSettings, attach_lora, load_base_model, torch_dtype
    from qlora_lite.planner.peak import track_peak

    model = load_base_model(str(path), quantization="nf4", double_quant=True, compute_dtype=compute_dtype,
                            accelerator="cuda")  # fmt: skip
    model = attach_lora(model, LoraSettings(r=16), gradient_checkpointing=case.gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (case.micro_batch_size, case.seq_len), device="cuda")
    seconds = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        with track_peak("cuda") as peak:
            with torch.autocast("cuda", dtype=torch_dtype(compute_dtype)):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    del model, optimizer, loss
    gc.collect()
    torch.cuda.empty_cache()
    return {"measured_bytes": peak.peak_bytes, "step_seconds": round(seconds, 3),
            "tokens_per_second": round(case.micro_batch_size * case.seq_len / seconds, 1)}  # fmt: skip


def multi_gpu_check(output: Path) -> int:
    """1 process vs 2 nccl ranks on the same data and effective batch: losses and adapters must agree."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "tests"))
    from models_util import build_tiny_model

    if torch.cuda.device_count() < 2:
        print(f"--multi-gpu needs 2+ GPUs; this machine has {torch.cuda.device_count()}, nothing to do.")
        return 0
    settings = ["--max-steps", "8", "--effective-batch-size", "8", "--lora-r", "8", "--lora-dropout", "0",
                "--quantization", "nf4", "--compute-dtype", "fp32", "--seed", "5", "--save-every-steps", "4",
                "--sample-generations", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model("llama", Path(tmp) / "model")
        data = Path(tmp) / "data.jsonl"
        rows = [
            {"instruction": f"Count to {i}", "output": " ".join(map(str, range(i % 17 + 1)))}
            for i in range(90)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs = {
            "one_process": [sys.executable, "-m", "qlora_lite", "train"],
            "two_ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "qlora_lite", "train"],
        }  # fmt: skip
        for name, launcher in runs.items():
            out = Path(tmp) / name
            start = time.perf_counter()
            proc = subprocess.run(
                [*launcher, "--model", str(model), "--data", str(data), "--output", str(out), *settings],
                capture_output=True, text=True, env={**env, **({"CUDA_VISIBLE_DEVICES": "0"} if name == "one_process" else {})},
            )  # fmt: skip
            result[name] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
            if proc.returncode != 0:
                result[name]["stderr_tail"] = proc.stderr[-3000:]
                continue
            record = json.loads((out / "run_record.json").read_text())
            steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
            result[name].update(
                world_size=record.get("world_size"), plan=record["plan"],
                losses=[r["loss"] for r in steps if "loss" in r],
                checkpoints=sorted(p.name for p in (out / "checkpoints").iterdir()),
                adapter={k: v.float() for k, v in load_file(out / "adapter_model.safetensors").items()},
            )  # fmt: skip
        one, two = result["one_process"], result["two_ranks"]
        a, b = one.pop("adapter", None), two.pop("adapter", None)
        ok = a is not None and b is not None
        if ok:
            loss_diff = max(abs(x - y) for x, y in zip(one["losses"], two["losses"], strict=True))
            adapter_diff = max((a[k] - b[k]).abs().max().item() for k in a)
            result["max_loss_difference"], result["max_adapter_difference"] = loss_diff, adapter_diff
            ok = two["world_size"] == 2 and loss_diff <= 1e-4 and adapter_diff <= 1e-4
    result["ok"] = ok
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("one_process", "two_ranks")}, indent=2))
    print(f"wrote {output}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU check of the memory model")
    parser.add_argument("--output", default=None)
    parser.add_argument("--multi-gpu", action="store_true", help="2 nccl ranks vs 1 process (needs 2+ GPUs)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; none is available here, nothing to do.")
        return 0
    if args.multi_gpu:
        return multi_gpu_check(Path(args.output or ROOT / "benchmarks" / "gpu_check_multi.json"))
    args.output = args.output or str(ROOT / "benchmarks" / "gpu_check.json")
    capability = torch.cuda.get_device_capability(0)
    compute_dtype = "bf16" if capability >= (8, 0) else "fp16"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, Path] = {}
        for case in CASES:
            if case.model not in built:
                built[case.model] = build_model(case.model, Path(tmp) / case.model)
            row = {**asdict(case), **predict(case, compute_dtype)}
            try:
                row.update(measure(case, built[case.model], compute_dtype))
                row.update(compare(row["predicted_bytes"], row["measured_bytes"]))
            except torch.OutOfMemoryError:
                row["measured_bytes"] = None
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
            measured = row.get("measured_bytes")
            print(f"{case.model:<20} mb {case.micro_batch_size} seq {case.seq_len} ckpt "
                  f"{'on ' if case.gradient_checkpointing else 'off'} predicted {row['predicted_bytes'] / 2**30:6.2f} GiB "
                  f"measured {measured / 2**30 if measured else float('nan'):6.2f} GiB "
                  f"error {row.get('error_pct', float('nan')):+6.1f}% {row.get('tokens_per_second', 0):8.0f} tok/s",
                  flush=True)  # fmt: skip
    result = {"device": torch.cuda.get_device_name(0), "compute_capability": list(capability),
              "compute_dtype": compute_dtype, "torch": torch.__version__, "rows": rows}  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
