"""`qlora-lite train`, `resume` and `runs`: start a run, continue an interrupted one, list runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qlora_lite.cli.flags import add_option_flags, print_result, settings_from_args
from qlora_lite.errors import UserError
from qlora_lite.options import TRAIN


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("train", help="train a LoRA adapter on a data file")
    t.add_argument("--model", help="model folder or Hub id")
    t.add_argument("--data", help="JSONL, JSON, CSV or Parquet file, or a Hub data set org/name[@REV]")
    t.add_argument("--output", help="run folder to write")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="train on N GPUs of this machine: starts N ranks with torchrun (same as `torchrun "
        "--nproc_per_node N -m qlora_lite train ...`); see docs/distributed.md",
    )
    add_option_flags(t, TRAIN)

    r = sub.add_parser("resume", help="continue an interrupted run with the settings it started with")
    r.add_argument("run_dir")
    r.add_argument(
        "--checkpoint-dir", help="where its durable checkpoints are, if not recorded (a fresh machine)"
    )
    r.add_argument("--resume", choices=["auto", "force", "local"], default="auto")
    r.add_argument("--no-progress", action="store_true")

    runs = sub.add_parser("runs", help="list runs under a folder with their last verified checkpoint")
    runs.add_argument("root", nargs="?", default="runs")


def cmd_train(args: argparse.Namespace) -> int:
    from qlora_lite.training import distributed
    from qlora_lite.training.api import train

    overrides = settings_from_args(args, TRAIN)
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: give 1 or more")
    if args.gpus and args.gpus > 1 and not distributed.ranks_from_environment().active:
        # Notebook users cannot call torchrun around a cell: start it for them, without --gpus.
        return distributed.launch(args.gpus, distributed.without_flag(args.argv, "--gpus"))
    result = train(args.model, args.data, args.output, progress=not args.no_progress, **overrides)
    if distributed.ranks_from_environment().is_main:  # one answer per run, not one per rank
        print_result(result)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from qlora_lite.config import make_config
    from qlora_lite.training.api import run_classifier, train
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


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "runs": cmd_runs}
