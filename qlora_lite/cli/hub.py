"""`qlora-lite push RUN_DIR REPO_ID`: upload a finished run to the Hub with a model card.

The token comes from HF_TOKEN, `hf auth login`, or the Colab secret; it is never a command-line flag
(flags end up in shell history and process lists).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_push_parser(subparsers: Any) -> None:
    """Add the `push` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "push",
        help="upload a run folder (adapter, tokenizer, run record, loss plot, model card) to the Hub",
        description=(
            "Upload a finished run to a Hugging Face model repo in one commit, with a generated README model "
            "card, then check the files on the Hub. The token is read from HF_TOKEN or `hf auth login`."
        ),
    )
    p.add_argument("run_dir", help="run folder written by `qlora-lite train`")
    p.add_argument("repo_id", help="model repo on the Hub, e.g. your-name/smollm2-orders")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private",
        dest="private",
        action="store_true",
        default=True,
        help="create the repo private (default); an existing repo keeps its visibility",
    )
    visibility.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument(
        "--revision", metavar="BRANCH", help="branch to commit to (created if needed; default main)"
    )
    p.add_argument("--message", metavar="MSG", help="commit message (default: model, rank, steps, loss)")


add_parsers = add_push_parser


def run_push(args: argparse.Namespace) -> int:
    """Push and print the commit URL; UserError (exit status 2 in the CLI) for anything the user can fix."""
    from qlora_lite.hub import push as hub

    result = hub.push(
        args.run_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.message
    )
    print(f"pushed {len(result.files)} files to {result.repo_url}")
    print(result.commit_url)
    return 0


COMMANDS = {"push": run_push}
