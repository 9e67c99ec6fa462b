"""`qlora-lite serve`: an OpenAI-compatible HTTP API for a base model and its adapters (or the vLLM command).

The API key comes from --api-key or, better (flags show up in process lists and shell history), the
QLORA_LITE_API_KEY environment variable.
"""

from __future__ import annotations

import argparse
from typing import Any

from qlora_lite.errors import UserError


def adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--adapter wants NAME=RUN_FOLDER_OR_HUB_ID, got {value!r}")
    return name.strip(), path.strip()


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a base model and its adapters behind an OpenAI-compatible HTTP API",
        description="OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, /v1/classify, "
        "/health, /v1/load_lora_adapter): the request's `model` picks the adapter. Needs the serve extra: "
        "pip install 'qlora-lite[serve]'.",
    )
    s.add_argument("--model", help="base model folder or Hub id (default: the base the adapters name)")
    s.add_argument("--adapter", action="append", type=adapter_arg, default=[], metavar="NAME=RUN_OR_ID",
                   help="an adapter served as model NAME (repeat for more)")  # fmt: skip
    s.add_argument(
        "--router", metavar="FILE", help="a router saved by `qlora-lite route`: enables model 'auto'"
    )
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env QLORA_LITE_API_KEY)")
    s.add_argument(
        "--host", help="address to listen on (default 127.0.0.1; another needs care: see --api-key)"
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="requests answered by one generate call")
    s.add_argument(
        "--batch-wait-ms", type=float, default=20.0, help="how long a batch waits for more requests"
    )
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    s.add_argument(
        "--max-tokens", type=int, default=512, help="cap on a request's max_tokens (and its default)"
    )
    s.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (then 504)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument(
        "--quantization", choices=["nf4", "int8", "none"], help="default: as the adapters were trained"
    )
    s.add_argument("--revision", help="branch, tag or commit of a Hub base model")
    s.add_argument("--no-runtime-lora", action="store_true", help="refuse /v1/load_lora_adapter and unload")
    s.add_argument("--print-vllm", action="store_true",
                   help="print the equivalent `vllm serve` command and vLLM's verdict on each adapter; serve nothing")  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise UserError("two --adapter flags use the same NAME: give each adapter its own name")
    if args.print_vllm:
        from qlora_lite.inference.server.vllm import print_vllm

        print(print_vllm(args.model, adapters))
        return 0
    if args.model is None and not adapters:
        raise UserError("give --model BASE, --adapter NAME=RUN, or both")
    from qlora_lite.inference.server.launch import Limits, serve

    limits = Limits(
        max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
        timeout=args.timeout, max_body_bytes=args.max_body_bytes, batch_wait=args.batch_wait_ms / 1000,
    )  # fmt: skip
    serve(
        args.model, adapters, router=args.router, api_key=args.api_key, host=args.host, port=args.port,
        limits=limits, runtime_lora=not args.no_runtime_lora, quantization=args.quantization,
        revision=args.revision, background=False,
    )  # fmt: skip
    return 0


add_parsers = add_serve_parser
COMMANDS = {"serve": run_serve}
