"""Push a run folder to the Hub with a model card, verified; load an adapter back by id.

result = push("runs/demo", "me/smollm2-orders")      # private by default, one commit
print(result.commit_url)
adapter_dir = resolve_adapter("me/smollm2-orders", revision="main")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from qlora_lite.compat import callable_module
from qlora_lite.errors import UserError
from qlora_lite.hub import client as hub_client
from qlora_lite.hub.card import REPO_ID_PATTERN, base_hub_id, base_name, render_model_card  # noqa: F401 (re-exported)
from qlora_lite.hub.client import (  # noqa: F401 (HubClient re-exported)
    NOT_PUBLISHED,
    HubClient,
    _check_account,
    _one_line,
    check_repo_id,
    hub_error,
    with_retries,
)
from qlora_lite.hub.token import TOKEN_HELP, resolve_token  # noqa: F401 (re-exported)
from qlora_lite.run_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFUSION_PLOT,
    GENERATION_CONFIG,
    LABELS_FILE,
    LOSS_PLOT,
    MANIFEST,
    RUN_RECORD,
)

log = logging.getLogger(__name__)

REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_RECORD)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
OPTIONAL_FILES = (
    LOSS_PLOT,
    GENERATION_CONFIG,
    LABELS_FILE,
    CONFUSION_PLOT,
)  # stop tokens; a classifier's labels

# ------------------------------------------------------------------------------------------------ push


@dataclass(frozen=True)
class PushResult:
    commit_url: str
    repo_url: str
    files: tuple[str, ...]


def _check_run_dir(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found: give a folder written by `qlora-lite train`")
    missing = [name for name in REQUIRED_FILES if not (run_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{run_dir} lacks {', '.join(missing)}: push a finished run folder (train writes these at the end)"
        )
    try:
        return json.loads((run_dir / RUN_RECORD).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{run_dir / 'run_record.json'} is not valid JSON ({exc}); re-run training") from None


Content = bytes | Path  # what goes up: bytes, or a file read from disk as it is sent (a LoftQ base's weights)


def _size_and_sha256(content: Content) -> tuple[int, str]:
    if isinstance(content, Path):
        from qlora_lite.checkpoint.manifest import sha256_file

        return sha256_file(content)
    return len(content), hashlib.sha256(content).hexdigest()


def _holds(content: Content, secret: bytes) -> bool:
    """Whether `secret` occurs in `content` (a file is read in pieces that overlap by len(secret) - 1)."""
    if not isinstance(content, Path):
        return secret in content
    tail = b""
    with open(content, "rb") as handle:
        while piece := handle.read(1 << 24):
            if secret in tail + piece:
                return True
            tail = piece[-(len(secret) - 1) :] if len(secret) > 1 else b""
    return False


def _upload_contents(run_dir: Path, card: str, base_id: str | None) -> dict[str, Content]:
    """What goes up, by path in the repo: adapter, tokenizer, run record, loss plot and the card."""
    names = [*REQUIRED_FILES, *TOKENIZER_FILES, *OPTIONAL_FILES]
    contents: dict[str, Content] = {
        name: (run_dir / name).read_bytes() for name in names if (run_dir / name).is_file()
    }
    config = json.loads(contents["adapter_config.json"])
    if base_id and config.get("base_model_name_or_path") != base_id:
        # A local base path would make AutoPeftModel look for a folder that exists only on the training machine.
        config["base_model_name_or_path"] = base_id
        contents["adapter_config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    contents["README.md"] = card.encode()
    own_base = json.loads(contents[RUN_RECORD]).get("loftq_base")
    if own_base:  # the 4-bit base LoftQ rewrote: the adapter loads onto it alone
        for path in sorted((run_dir / own_base["folder"]).iterdir()):
            data: Content = path  # gigabytes for a large model: sent from disk
            if path.name == MANIFEST:  # it names the base it was made from: no local folders in public
                public = without_local_paths(json.loads(path.read_text()))
                data = (json.dumps(public, indent=2, sort_keys=True) + "\n").encode()
            contents[f"{own_base['folder']}/{path.name}"] = data
    record = json.loads(contents[RUN_RECORD])
    public_record = without_local_paths(record)
    if public_record != record:  # rewrite only when a path was cut: otherwise the bytes go up as written
        contents[RUN_RECORD] = (json.dumps(public_record, indent=2) + "\n").encode()
    return contents


def without_local_paths(value: Any) -> Any:
    """`value` with every absolute local path cut to its last part: a pushed run record must not show the
    training machine's folders (user names, mount points)."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value)):
        return PureWindowsPath(value).name if "\\" in value else Path(value).name
    return value


def default_commit_message(record: dict) -> str:
    """'qlora_lite: SmolLM2-135M-Instruct LoRA r16, 60 steps, eval loss 0.0123'."""
    lora, metrics = record.get("lora") or {}, record.get("metrics") or {}
    parts = [f"qlora_lite: {base_name(record)} LoRA r{lora.get('r', '?')}"]
    if metrics.get("steps") is not None:
        parts.append(f"{metrics['steps']} steps")
    loss = metrics.get("eval_loss") if metrics.get("eval_loss") is not None else metrics.get("train_loss")
    if loss is not None:
        kind = "eval" if metrics.get("eval_loss") is not None else "train"
        parts.append(f"{kind} loss {loss:.4g}")
    return ", ".join(parts)


def push(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    client: HubClient | None = None,
    base_model: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
) -> PushResult:
    """Upload a run folder to the Hub as one commit with a generated model card; returns the commit URL.

    Creates the repo (private unless private=False) when needed; an existing repo keeps its visibility.
    `base_model` (a Hub id) names the base in the card when the run used a local folder.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(run_dir).expanduser()
    record = _check_run_dir(folder)
    check_repo_id(repo_id)
    token = resolve_token(token)
    if client is None:
        if not token:
            raise UserError(f"no Hugging Face token to push {repo_id} with: {TOKEN_HELP}")
        client = hub_client.make_client(token)
    try:
        who = with_retries(client.whoami, "asking the Hub who the token belongs to")
    except Exception as exc:
        raise hub_error(exc, repo_id, "cannot push to") from None
    if "/" not in repo_id:
        repo_id = f"{who.get('name')}/{repo_id}"
    _check_account(who, repo_id.split("/")[0], repo_id)
    base_id = base_model or base_hub_id(record)
    card = render_model_card(folder, repo_id, base_model=base_id, license=license, datasets=datasets)
    contents = _upload_contents(folder, card, base_id)
    for name, data in contents.items():
        if token and _holds(data, token.encode()):
            raise UserError(f"{folder / name} contains your Hugging Face token: remove it; {NOT_PUBLISHED}")
    message = commit_message or default_commit_message(record)
    try:
        repo_url = _ensure_repo(client, repo_id, private)
        if revision and revision != "main":
            with_retries(lambda: client.create_branch(repo_id, revision), f"creating branch {revision}")
        operations = lambda: [  # noqa: E731
            CommitOperationAdd(p, str(data) if isinstance(data, Path) else data)
            for p, data in contents.items()
        ]
        commit_url = with_retries(
            lambda: client.create_commit(repo_id, operations(), commit_message=message, revision=revision),
            f"uploading {folder} to {repo_id}",
        )
    except Exception as exc:
        raise hub_error(exc, repo_id, "cannot push to") from None
    _verify_upload(client, repo_id, revision, contents, commit_url)
    log.info("pushed %d files of %s to %s (verified): %s", len(contents), folder, repo_id, commit_url)
    return PushResult(commit_url, repo_url, tuple(sorted(contents)))


def _verify_upload(
    client: HubClient, repo_id: str, revision: str | None, contents: dict[str, Content], commit_url: str
) -> None:
    """Check that the Hub lists every uploaded file with its size (and sha256 where it reports one)."""

    try:
        remote = with_retries(lambda: client.list_files(repo_id, revision=revision), "listing the upload")
    except Exception as exc:
        raise UserError(
            f"pushed {commit_url}, but listing {repo_id} to verify it failed ({_one_line(exc)}): check the files "
            "on the repo page, or run `qlora-lite push` again"
        ) from None
    sent = {path: _size_and_sha256(data) for path, data in contents.items()}
    wrong = [
        path
        for path, (size, sha256) in sent.items()
        if path not in remote or remote[path].size != size or remote[path].sha256 not in (None, sha256)
    ]
    if wrong:
        raise UserError(
            f"pushed {commit_url}, but the Hub shows {', '.join(wrong)} missing or different: "
            "run `qlora-lite push` again"
        )


def _ensure_repo(client: HubClient, repo_id: str, private: bool) -> str:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        is_private = with_retries(lambda: client.repo_private(repo_id), f"looking up {repo_id}")
    except RepositoryNotFoundError:
        return with_retries(lambda: client.create_repo(repo_id, private=private), f"creating {repo_id}")
    log.warning(
        "%s exists and is %s; push does not change its visibility (change it in the repo settings)",
        repo_id,
        "private" if is_private else "PUBLIC",
    )
    return f"{client.endpoint}/{repo_id}"


# ---------------------------------------------------------------------------------------- load back


def resolve_adapter(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    *,
    client: HubClient | None = None,
    token: str | None = None,
) -> Path:
    """A local adapter folder as is; a Hub id ('user/name', at `revision`) downloaded to the HF cache."""
    text = str(path_or_repo_id)
    local = Path(text).expanduser()
    if local.is_dir():
        if revision is not None:
            raise UserError(f"{local} is a local folder: --revision applies to Hub repo ids only; drop it")
        return local
    if not REPO_ID_PATTERN.match(text) or text.startswith((".", "~")):
        raise UserError(f"adapter {text!r} not found: give a run folder or a Hub id like 'user/adapter-name'")
    check_repo_id(text)
    client = client or hub_client.make_client(resolve_token(token))
    try:
        folder = with_retries(
            lambda: client.snapshot_download(text, revision=revision), f"downloading the adapter {text}"
        )
    except Exception as exc:
        error = hub_error(exc, text, f"adapter {text!r} is not a local folder, and cannot download")
        if "HF_HUB_OFFLINE" in str(error) or type(exc).__name__ == "LocalEntryNotFoundError":
            error = UserError(
                f"adapter {text!r} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
                "forbids downloading it; unset HF_HUB_OFFLINE or give a local folder"
            )
        raise error from None
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"Hub repo {text} has no adapter_config.json: it is not a PEFT adapter")
    return folder


# `from qlora_lite.hub import push; push(run_dir, repo_id)` worked when hub was one module: keep it working.
callable_module(__name__, push)
