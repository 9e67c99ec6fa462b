"""How the server holds up under concurrent clients: batched (requests share generate calls, each row its own
adapter) vs one-at-a-time (--max-batch 1), for 1, 4 and 16 concurrent clients.

SmolLM2-135M-Instruct (16-bit on CPU, the fastest there) with two LoRA adapters, the base and both adapters
asked in turn; each client sends its requests one after another (a closed loop) through the real `openai`
client over loopback HTTP. Writes benchmarks/serve.json: requests/s, p50/p95 latency, completion tokens/s,
the batched/one-at-a-time ratio, and how many batched answers differ from their one-at-a-time answer.

    .venv/bin/python scripts/benchmark_serve.py [--max-tokens 24] [--model PATH] [--quantization none]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CLIENTS = (1, 4, 16)
TOPICS = (
    "the fox",
    "a parcel that is late",
    "Paris",
    "cats and dogs",
    "a JSON order",
    "numbers",
    "the weather",
)


def make_adapters(base: str, root: Path) -> dict[str, str]:
    """Two LoRA adapters (r16, all linear layers) with random non-zero weights, so each changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for seed, name in enumerate(("support", "orders"), start=1):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def workload(models: list[str], clients: int) -> list[list[tuple[str, str]]]:
    """Per client, its requests: (model, question); at least 6 requests in all, 2 per client for many."""
    per_client = max(2, -(-6 // clients))
    plan = []
    for c in range(clients):
        rows = []
        for i in range(per_client):
            k = c * per_client + i
            rows.append(
                (models[k % len(models)], f"In two sentences, tell me about {TOPICS[k % len(TOPICS)]} ({k}).")
            )
        plan.append(rows)
    return plan


def run(url: str, plan: list[list[tuple[str, str]]], max_tokens: int) -> tuple[dict, dict]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    answers: dict[tuple[str, str], str] = {}
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(len(plan))

    def one_client(rows: list[tuple[str, str]]) -> None:
        start.wait()
        for model, question in rows:
            began = time.perf_counter()
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0,
            )
            with lock:
                latencies.append(time.perf_counter() - began)
                tokens[0] += reply.usage.completion_tokens
                answers[(model, question)] = reply.choices[0].message.content

    began = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(one_client, plan))
    wall = time.perf_counter() - began
    latencies.sort()
    stats = {
        "clients": len(plan),
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], 3),
        "completion_tokens_per_s": round(tokens[0] / wall, 1),
    }
    return stats, answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="base model folder (default: SmolLM2-135M-Instruct, the demo model)")
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--output", default="benchmarks/serve.json")
    parser.add_argument(
        "--threads", type=int, help="torch threads (1 on a shared machine: OpenMP threads that wait for a busy "
        "core make every step many times slower)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qlora_lite import ensure_demo_model
    from qlora_lite.inference.adapters import AdapterSet
    from qlora_lite.inference.server import Limits, serve

    base = args.model or str(ensure_demo_model())
    results, answers = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_set = AdapterSet(base, make_adapters(base, Path(tmp)), quantization=args.quantization)
        models = [adapter_set.base_id, *adapter_set.names]
        modes = {"one-at-a-time": 1, "batched": args.max_batch}
        # Both servers stay up (only one works at a time) and the modes alternate per client count, so
        # that each ratio compares two runs made minutes apart, not half an hour apart.
        handles = {
            mode: serve(adapter_set, port=0, background=True, limits=Limits(max_batch=b))
            for mode, b in modes.items()
        }
        try:
            for handle in handles.values():
                run(handle.url, workload(models, 1)[:1], args.max_tokens)  # warm-up
            for clients in CLIENTS:
                for mode, handle in handles.items():
                    stats, got = run(handle.url, workload(models, clients), args.max_tokens)
                    results.append({"mode": mode, "max_batch": modes[mode], **stats})
                    answers[(mode, clients)] = got
                    print(json.dumps(results[-1]), flush=True)
        finally:
            for handle in handles.values():
                handle.stop()
    mismatches = sum(
        answers[("batched", c)][key] != answers[("one-at-a-time", c)][key]
        for c in CLIENTS
        for key in answers[("batched", c)]
    )
    by = {(r["mode"], r["clients"]): r for r in results}
    report = {
        "model": f"{Path(base).name}, quantization {args.quantization}, two LoRA adapters r16 all-linear + the base",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "max_tokens": args.max_tokens,
        "note": "a closed loop: each client sends its next request when the last one answered; greedy decoding",
        "results": results,
        "batched_vs_one_at_a_time_requests_per_s": {
            str(c): round(
                by[("batched", c)]["requests_per_s"] / by[("one-at-a-time", c)]["requests_per_s"], 2
            )
            for c in CLIENTS
        },
        "answers_differing_between_modes": mismatches,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["batched_vs_one_at_a_time_requests_per_s"]), "differing answers:", mismatches)


if __name__ == "__main__":
    main()
