"""`qlora-lite merge | combine | route | adapters inspect`: many adapters on one base, from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError


def _pairs(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name.strip(), rest.strip()


def add_adapter_parsers(sub: Any) -> None:
    m = sub.add_parser(
        "merge", help="merge an adapter into its base (dequantized as trained) and save the model"
    )
    m.add_argument("run_dir", help="run folder or Hub id of the adapter")
    m.add_argument("--output", required=True, help="new folder for the merged model")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    m.add_argument("--revision", help="branch, tag or commit when run_dir is a Hub id")
    m.add_argument("--model", help="base model (default: the one in the run record)")
    m.add_argument(
        "--quantize", choices=["nf4"], help="re-quantize the merged model (refused without the next flag)"
    )
    m.add_argument("--allow-requantize", action="store_true", help="accept the loss re-quantizing causes")

    c = sub.add_parser("combine", help="combine adapters of one base into a new adapter (PEFT, with guards)")
    c.add_argument("adapters", nargs="+", help="run folders or Hub ids (at least two)")
    c.add_argument("--output", required=True, help="new folder for the combined adapter")
    c.add_argument("--method", choices=["cat", "linear", "svd", "ties", "dare_ties"], default="cat")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    c.add_argument("--density", type=float, help="ties/dare_ties: fraction of each update kept (default 0.5)")
    c.add_argument("--model", help="base model (default: the one in the first run record)")

    r = sub.add_parser("route", help="build, ask or evaluate a router that picks an adapter per request")
    rsub = r.add_subparsers(dest="route_command", required=True)
    b = rsub.add_parser("build", help="build a router file")
    b.add_argument("output", help="router file to write (JSON)")
    b.add_argument("--adapter", type=_pairs, action="append", default=[], metavar="NAME=RUN",
                   help="an adapter and its run folder (its training prompts form its domain)")  # fmt: skip
    b.add_argument("--keywords", type=_pairs, action="append", default=[], metavar="NAME=w1,w2",
                   help="explicit keyword rules instead")  # fmt: skip
    b.add_argument("--classifier", help="a classifier run whose labels name adapters, instead")
    b.add_argument("--label", type=_pairs, action="append", default=[], metavar="LABEL=NAME",
                   help="classifier label -> adapter name (NAME 'base' for the base)")  # fmt: skip
    b.add_argument("--threshold", type=float, help="below this score: the base (default per kind)")
    b.add_argument("--margin", type=float, help="winner must lead by this much, else the base")
    a = rsub.add_parser("ask", help="route one text")
    a.add_argument("router")
    a.add_argument("--text", required=True)
    e = rsub.add_parser("evaluate", help="routing accuracy on held-out JSONL rows {text, adapter}")
    e.add_argument("router")
    e.add_argument("held_out")

    i = sub.add_parser("adapters", help="inspect adapters")
    isub = i.add_subparsers(dest="adapters_command", required=True)
    ins = isub.add_parser(
        "inspect", help="rank, targets, size; whether vLLM and llama.cpp accept it and why not"
    )
    ins.add_argument("run_dir", help="run folder or Hub id")
    ins.add_argument("--revision")
    ins.add_argument("--json", action="store_true")


def run_merge(args: argparse.Namespace) -> int:
    from qlora_lite.inference.merge import merge_adapter

    result = merge_adapter(
        args.run_dir, args.output, dtype=args.dtype, revision=args.revision, model=args.model,
        quantize=args.quantize, allow_requantize=args.allow_requantize,
    )  # fmt: skip
    print(json.dumps({"output_dir": str(result.output_dir), **result.report}, indent=2))
    return 0


def run_combine(args: argparse.Namespace) -> int:
    from qlora_lite.inference.combine_save import combine_adapters

    out = combine_adapters(
        args.adapters,
        args.output,
        method=args.method,
        weights=args.weights,
        density=args.density,
        model=args.model,
    )
    print(out)
    return 0


def run_route(args: argparse.Namespace) -> int:
    from qlora_lite.inference.router import Router

    if args.route_command == "build":
        kinds = [bool(args.adapter), bool(args.keywords), bool(args.classifier)]
        if sum(kinds) != 1:
            raise UserError(
                "give exactly one of --adapter NAME=RUN (repeat), --keywords NAME=w1,w2, --classifier RUN"
            )
        knobs = {k: v for k, v in (("threshold", args.threshold), ("margin", args.margin)) if v is not None}
        if args.adapter:
            router = Router.from_adapters(dict(args.adapter), **knobs)
        elif args.keywords:
            router = Router.from_keywords({n: w.split(",") for n, w in args.keywords}, **knobs)
        else:
            labels = {label: None if name == "base" else name for label, name in args.label}
            router = Router.from_classifier(args.classifier, labels, **knobs)
        print(router.save(args.output))
        return 0
    router = Router.load(args.router)
    if args.route_command == "ask":
        print(json.dumps(router.route(args.text)._asdict()))
        return 0
    print(json.dumps(router.evaluate(_read_held_out(Path(args.held_out))), indent=2))
    return 0


def _read_held_out(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"held-out file {path} not found")
    rows = []
    for number, line in enumerate(path.read_text().split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path} line {number}: expected {{"text": ..., "adapter": ...}}')
        rows.append(row)
    return rows


def run_adapters(args: argparse.Namespace) -> int:
    from qlora_lite.inference.portability import adapter_report, format_report

    report = adapter_report(args.run_dir, args.revision)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


add_parsers = add_adapter_parsers
COMMANDS = {"merge": run_merge, "combine": run_combine, "route": run_route, "adapters": run_adapters}
