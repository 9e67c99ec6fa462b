"""`qlora-lite doctor`: what this machine has (GPUs, memory, bf16, free disk, environment)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parsers(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="show the detected hardware")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--output", default=".", help="where a run would write (for free disk)")


def cmd_doctor(args: argparse.Namespace) -> int:
    from qlora_lite.planner.hardware import describe, detect

    profile = detect(args.output)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    else:
        rows = describe(profile)
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


COMMANDS = {"doctor": cmd_doctor}
