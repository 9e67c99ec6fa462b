"""Two real adapters (orders -> JSON, dates -> ISO) on one SmolLM2-135M base: accuracy, routing, switch vs reload.

OMP_NUM_THREADS=2 .venv/bin/python scripts/demo_adapters.py     # trains two runs (reused when re-run)
Writes benchmarks/adapters.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_lite.cli.main import setup_logging  # noqa: E402
from qlora_lite.demo.adapters import format_adapters_summary, run_adapters_demo  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/adapters-demo")
    parser.add_argument("--benchmark", default=str(ROOT / "benchmarks" / "adapters.json"))
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--reuse", action="append", default=[], metavar="TASK=FOLDER",
        help="reuse a run (e.g. orders=runs/demo from `qlora-lite demo`) or a checkpoint folder instead of training",
    )  # fmt: skip
    args = parser.parse_args()
    setup_logging(debug=False)
    logging.getLogger("qlora_lite").setLevel(logging.INFO)
    summary = run_adapters_demo(
        args.output, max_steps=args.max_steps, learning_rate=args.learning_rate, n_eval=args.n_eval, progress=not args.no_progress,
        reuse=dict(item.split("=", 1) for item in args.reuse) or None,
    )  # fmt: skip
    print(format_adapters_summary(summary))
    bench = Path(args.benchmark)
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2) + "\n")
    print(f"numbers written to {bench}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
