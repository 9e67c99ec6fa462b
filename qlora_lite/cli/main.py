"""`qlora-lite`: the parser assembled from one module per command group, dispatch, and logging setup.

Each command module (cli/train.py, plan.py, classify.py, generate.py, hub.py, doctor.py, demo.py,
adapters.py, serve.py) has
`add_parsers(subparsers)` and `COMMANDS` (name -> handler); a new command group is one module listed in
COMMAND_MODULES. Handlers raise UserError for anything the user can fix: exit status 2, one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from qlora_lite.cli import adapters, classify, demo, doctor, generate, hub, plan, serve, train
from qlora_lite.errors import UserError
from qlora_lite.hub.token import protect_token, redact

log = logging.getLogger("qlora_lite")

COMMAND_MODULES = (doctor, train, generate, demo, plan, hub, classify, adapters, serve)
COMMANDS = {name: handler for module in COMMAND_MODULES for name, handler in module.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-lite", description="Fine-tune LLMs with LoRA/QLoRA that fits."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


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
    args.argv = list(
        sys.argv[1:] if argv is None else argv
    )  # `train --gpus N` re-launches itself under torchrun
    setup_logging(args.debug)
    protect_token(os.environ.get("HF_TOKEN"))  # kept out of every log line and error message from here on
    handler = COMMANDS[args.command]
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
