"""Train the built-in intent classifier on CPU and write the measured numbers to benchmarks/classify_demo.json.

OMP_NUM_THREADS=1 .venv/bin/python scripts/demo_classify.py                 # all-MiniLM-L6-v2, ~1 minute
OMP_NUM_THREADS=2 .venv/bin/python scripts/demo_classify.py --model smollm2  # SmolLM2-135M in 4-bit
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
from qlora_lite.demo.classify import format_classify_summary, run_classify_demo  # noqa: E402
from qlora_lite.errors import UserError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm, smollm2 or a model folder")
    parser.add_argument("--output", default="runs/classify-demo")
    parser.add_argument("--benchmark", default=str(ROOT / "benchmarks" / "classify_demo.json"))
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    setup_logging(debug=False)
    logging.getLogger("qlora_lite").setLevel(logging.INFO)
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    try:
        summary = run_classify_demo(args.output, model=args.model, progress=not args.no_progress, **overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_classify_summary(summary))
    bench = Path(args.benchmark)
    results = json.loads(bench.read_text()) if bench.is_file() else {}
    results[summary["model"]] = {k: v for k, v in summary.items() if k not in ("run_dir", "confusion_matrix")}
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"numbers written to {bench}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
