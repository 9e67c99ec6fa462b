"""`qlora-lite demo`: train the built-in demo (SmolLM2-135M, CPU is fine) and show before/after."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("demo", help="train the built-in demo (SmolLM2-135M, CPU ok) and show before/after")
    d.add_argument("--output", default="runs/demo")
    d.add_argument("--max-steps", type=int, default=60)
    d.add_argument("--no-progress", action="store_true")


def cmd_demo(args: argparse.Namespace) -> int:
    from qlora_lite.demo.run import format_summary, run_demo

    summary = run_demo(args.output, max_steps=args.max_steps, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


COMMANDS = {"demo": cmd_demo}
