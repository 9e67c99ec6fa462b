"""`qlora-lite generate`: run a prompt or a chat through a base model and (optionally) an adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("generate", help="run a prompt or chat through base + adapter")
    g.add_argument("run_dir", nargs="?", help="adapter/run folder or Hub id (omit to use --model alone)")
    g.add_argument("--revision", help="branch, tag or commit when run_dir is a Hub id")
    g.add_argument("--model", help="base model (default: the one in the run record)")
    g.add_argument("--prompt", help="a user prompt")
    g.add_argument("--chat", help="a JSON file holding [{'role':..., 'content':...}, ...]")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)


def read_chat(path: Path) -> list[dict]:
    """A chat file: a JSON list of {'role', 'content'} messages (UserError naming the file otherwise)."""
    if not path.is_file():
        raise UserError(f"chat file {path} not found")
    try:
        chat = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} line {exc.lineno}: not JSON ({exc.msg}); expected a list of messages"
        ) from None
    if not isinstance(chat, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in chat
    ):
        raise UserError(f"{path}: expected a list of {{'role': ..., 'content': ...}} messages")
    return chat


def cmd_generate(args: argparse.Namespace) -> int:
    from qlora_lite.inference.generation import generate

    if (args.prompt is None) == (args.chat is None):
        raise UserError("give exactly one of --prompt TEXT or --chat FILE")
    if args.run_dir is None and args.model is None:
        raise UserError("give a run folder or --model")
    prompt: Any = args.prompt if args.chat is None else read_chat(Path(args.chat))
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


COMMANDS = {"generate": cmd_generate}
