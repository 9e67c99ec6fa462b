"""`qlora-lite`: one subcommand per user action, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from qlora_lite.cli.flags import TRAIN_FLAGS, add_run_flags, print_result
from qlora_lite.errors import UserError
from qlora_lite.hub.token import protect_token, redact

log = logging.getLogger("qlora_lite")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-lite", description="Fine-tune LLMs with LoRA/QLoRA that fits."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="show the detected hardware")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--output", default=".", help="where a run would write (for free disk)")

    t = sub.add_parser("train", help="train a LoRA adapter on a data file")
    t.add_argument("--model", required=True, help="model folder or Hub id")
    t.add_argument(
        "--data", required=True, help="JSONL, JSON, CSV or Parquet file, or a Hub data set org/name[@REV]"
    )
    t.add_argument(
        "--chat-template",
        help="the tokenizer's own (default; ChatML if it has none), chatml, llama3, gemma, or a Jinja file",
    )
    t.add_argument("--output", required=True, help="run folder to write")
    t.add_argument("--format", help="data format (default: detected)")
    add_run_flags(t)
    t.add_argument(
        "--eval-generations", type=int, help="held-out prompts scored by exact/contains match (default 0)"
    )
    t.add_argument("--sample-generations", type=int, help="held-out answers shown before/after (default 3)")
    t.add_argument("--train-on", choices=["assistant", "all"], default="assistant")
    t.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="push the adapter and a model card when training ends"
    )
    t.add_argument(
        "--hub-public", dest="hub_private", action="store_false", default=None, help="make a new repo public"
    )
    t.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="train on N GPUs of this machine: starts N ranks with torchrun (same as `torchrun "
        "--nproc_per_node N -m qlora_lite train ...`); see docs/distributed.md",
    )

    r = sub.add_parser("resume", help="continue an interrupted run with the settings it started with")
    r.add_argument("run_dir")
    r.add_argument(
        "--checkpoint-dir", help="where its durable checkpoints are, if not recorded (a fresh machine)"
    )
    r.add_argument("--resume", choices=["auto", "force", "local"], default="auto")
    r.add_argument("--no-progress", action="store_true")

    runs = sub.add_parser("runs", help="list runs under a folder with their last verified checkpoint")
    runs.add_argument("root", nargs="?", default="runs")

    g = sub.add_parser("generate", help="run a prompt or chat through base + adapter")
    g.add_argument("run_dir", nargs="?", help="adapter/run folder or Hub id (omit to use --model alone)")
    g.add_argument("--revision", help="branch, tag or commit when run_dir is a Hub id")
    g.add_argument("--model", help="base model (default: the one in the run record)")
    g.add_argument("--prompt", help="a user prompt")
    g.add_argument("--chat", help="a JSON file holding [{'role':..., 'content':...}, ...]")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)

    d = sub.add_parser("demo", help="train the built-in demo (SmolLM2-135M, CPU ok) and show before/after")
    d.add_argument("--output", default="runs/demo")
    d.add_argument("--max-steps", type=int, default=60)
    d.add_argument("--no-progress", action="store_true")

    try:
        from qlora_lite.cli.plan import add_plan_parser
    except ImportError:  # the planner CLI arrives with the planner
        pass
    else:
        add_plan_parser(sub)
    from qlora_lite.cli.hub import add_push_parser

    add_push_parser(sub)
    from qlora_lite.cli.classify import add_classify_parsers

    add_classify_parsers(sub)
    from qlora_lite.cli.adapters import add_adapter_parsers

    add_adapter_parsers(sub)
    from qlora_lite.cli.serve import add_serve_parser

    add_serve_parser(sub)
    return parser


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


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_lite.training import distributed

    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give 1 or more")
    if args.gpus and args.gpus > 1 and not distributed.ranks_from_environment().active:
        # Notebook users cannot call torchrun around a cell: start it for them, without --gpus.
        return distributed.launch(args.gpus, distributed.without_flag(args.argv, "--gpus"))
    from qlora_lite.training.run import train

    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None
    }
    overrides["progress"] = not args.no_progress
    result = train(args.model, args.data, args.output, **overrides)
    if distributed.ranks_from_environment().is_main:  # one answer per run, not one per rank
        print_result(result)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlora_lite.training.run import train
    from qlora_lite.training.setup import saved_run_config

    run_dir = Path(args.run_dir)
    saved = saved_run_config(run_dir, args.checkpoint_dir)  # run_config.json, or the durable place's copy
    if saved.get("data") is None:
        raise UserError(
            f"{run_dir} was trained on in-memory data: resume it by running the same train() call again"
        )
    settings = dict(saved["settings"])
    settings.update(resume=args.resume, progress=not args.no_progress, overwrite=False)
    if args.checkpoint_dir:
        settings["checkpoint_dir"] = args.checkpoint_dir
    if saved.get("hardware"):
        settings["hardware"] = saved["hardware"]
    if "classifier" in saved:
        from qlora_lite.config import make_config
        from qlora_lite.training.classifier import run_classifier

        extra = saved["classifier"]
        config = make_config(saved["model"], saved["data"], str(run_dir), **settings)
        result = run_classifier(
            config,
            labels=extra.get("labels"),
            class_weights=extra.get("class_weights"),
            eval_data=extra.get("eval_data"),
        )
    else:
        result = train(saved["model"], saved["data"], str(run_dir), **settings)
    from qlora_lite.training.distributed import ranks_from_environment

    if ranks_from_environment().is_main:  # under torchrun: one answer, from rank 0
        print_result(result)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from qlora_lite.checkpoint.runs import format_runs, list_runs

    print(format_runs(list_runs(args.root)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlora_lite.inference.generation import generate

    if (args.prompt is None) == (args.chat is None):
        raise UserError("give exactly one of --prompt TEXT or --chat FILE")
    if args.run_dir is None and args.model is None:
        raise UserError("give a run folder or --model")
    prompt: Any = args.prompt
    if args.chat is not None:
        path = Path(args.chat)
        if not path.is_file():
            raise UserError(f"chat file {path} not found")
        try:
            prompt = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {exc.lineno}: not JSON ({exc.msg}); expected a list of messages"
            ) from None
        if not isinstance(prompt, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            raise UserError(f"{path}: expected a list of {{'role': ..., 'content': ...}} messages")
    print(
        generate(
            prompt,
            adapter=args.run_dir,
            model=args.model,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            revision=args.revision,
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qlora_lite.demo.run import format_summary, run_demo

    summary = run_demo(args.output, max_steps=args.max_steps, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


COMMANDS = {
    "doctor": cmd_doctor,
    "train": cmd_train,
    "resume": cmd_resume,
    "runs": cmd_runs,
    "generate": cmd_generate,
    "demo": cmd_demo,
}


def _handler(command: str):
    """Subcommands that live beside their feature (plan, push, classify) are imported when used."""
    if command in COMMANDS:
        return COMMANDS[command]
    if command == "plan":
        from qlora_lite.cli.plan import run_plan

        return run_plan
    if command == "push":
        from qlora_lite.cli.hub import run_push

        return run_push
    if command == "serve":
        from qlora_lite.cli.serve import run_serve

        return run_serve
    from qlora_lite.cli.adapters import COMMANDS as adapter_commands

    if command in adapter_commands:
        return adapter_commands[command]
    from qlora_lite.cli.classify import COMMANDS as classify_commands

    return classify_commands[command]


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in (
        "transformers",
        "bitsandbytes",
        "peft",
        "accelerate",
        "urllib3",
        "httpx",
        "httpx2",
        "matplotlib",
        "filelock",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.INFO)
    if not debug:
        # Deprecation chatter from the libraries we call is not the user's business.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug)
    protect_token(os.environ.get("HF_TOKEN"))  # kept out of every log line and error message from here on
    handler = _handler(args.command)
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)  # one line, never the token
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
