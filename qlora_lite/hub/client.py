"""The Hugging Face Hub: push a run folder with a model card, find the token, load an adapter back by id.

Everything that reaches the network goes through `HubClient`, one narrow wrapper around the `HfApi`
methods qlora_lite uses; tests swap it for a fake (tests/fake_hub.py) by replacing `make_client`.
Everything above it — file selection, the card, retries, error messages, verification — is plain code.

    result = push("runs/demo", "me/smollm2-orders")      # private by default, one commit
    print(result.commit_url)
    adapter_dir = resolve_adapter("me/smollm2-orders", revision="main")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qlora_lite.errors import UserError
from qlora_lite.hub.card import REPO_ID_PATTERN, base_hub_id, base_name, render_model_card  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors", "run_record.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
OPTIONAL_FILES = ("loss.png",)
RETRY_DELAYS: tuple[float, ...] = (2.0, 8.0, 30.0)  # seconds before each retry of a transient failure
TOKEN_HELP = (
    "set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens), run `hf auth login`, "
    "or in Colab add the secret HF_TOKEN (key icon) and pass token=userdata.get('HF_TOKEN')"
)
NOT_PUBLISHED = "nothing was published; the local run is untouched; run `qlora-lite push` again"


# ------------------------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class RemoteFile:
    """A file in a Hub repo: its size, and its sha256 when the Hub stores it in LFS/Xet."""

    size: int
    sha256: str | None = None


class HubClient:
    """The only object that talks to the Hub: the few `HfApi` calls qlora_lite makes, with plain results."""

    def __init__(self, token: str | None, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self._api = HfApi(endpoint=endpoint, token=token)
        self._token = token

    def __repr__(self) -> str:  # never show the token
        return f"HubClient(endpoint={self.endpoint!r})"

    @property
    def endpoint(self) -> str:
        return self._api.endpoint

    def whoami(self) -> dict:
        """The token's account: {"name", "orgs": [{"name"}], "auth": {"accessToken": {"role"}}}."""
        return self._api.whoami()

    def repo_private(self, repo_id: str) -> bool:
        """Whether the model repo is private; raises RepositoryNotFoundError when it is not visible."""
        return bool(self._api.repo_info(repo_id, repo_type="model").private)

    def create_repo(self, repo_id: str, *, private: bool) -> str:
        """Create the model repo (no error when it exists: its visibility is then left unchanged)."""
        return str(self._api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))

    def create_branch(self, repo_id: str, branch: str) -> None:
        self._api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")

    def create_commit(
        self, repo_id: str, operations: list, *, commit_message: str, revision: str | None = None
    ) -> str:
        """Apply CommitOperationAdd/Delete operations as one commit; returns the commit URL."""
        info = self._api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model"
        )
        return info.commit_url

    def list_files(
        self, repo_id: str, *, revision: str | None = None, prefix: str | None = None
    ) -> dict[str, RemoteFile]:
        """Every file under `prefix` (the whole repo when None) with its size and LFS sha256."""
        from huggingface_hub.hf_api import RepoFile

        files = {}
        for entry in self._api.list_repo_tree(
            repo_id, path_in_repo=prefix, recursive=True, revision=revision, repo_type="model"
        ):
            if isinstance(entry, RepoFile):
                files[entry.path] = RemoteFile(entry.size, entry.lfs.sha256 if entry.lfs else None)
        return files

    def snapshot_download(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        allow_patterns: list[str] | None = None,
        local_dir: str | os.PathLike | None = None,
    ) -> Path:
        """Download the repo (or the files matching `allow_patterns`) to the HF cache or `local_dir`."""
        return Path(
            self._api.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                local_dir=local_dir,
                repo_type="model",
            )
        )


def make_client(token: str | None) -> HubClient:
    """The client push/resolve_adapter/backend_from_spec use when none is given (tests replace this)."""
    return HubClient(token)


# -------------------------------------------------------------------------------------------- the token


_SECRETS: set[str] = set()
_REDACTED = "hf_***"
_factory_installed = False


def redact(text: str) -> str:
    """`text` with every token this process has used replaced by 'hf_***'."""
    for secret in _SECRETS:
        text = text.replace(secret, _REDACTED)
    return text


def protect_token(token: str | None) -> None:
    """Redact `token` from every log record from now on, whatever logger or handler prints it.

    A log-record factory (installed once) rather than a filter on some handlers: filters on a logger miss
    records of its children, and filters on handlers miss handlers added later.
    """
    global _factory_installed
    if not token or len(token) < 8:
        return
    _SECRETS.add(token)
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not ours
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def in_colab() -> bool:
    """True inside a Colab notebook kernel (not in a `!python` subprocess, which cannot read secrets)."""
    try:
        from huggingface_hub.utils import is_google_colab
    except ImportError:
        return False
    return is_google_colab()


def resolve_token(explicit: str | None = None) -> str | None:
    """The Hub token: `explicit`, else $HF_TOKEN, else the file `hf auth login` wrote, else (in a Colab
    notebook process only) the Colab secret HF_TOKEN. None when there is none.

    huggingface_hub's `get_token` reads those three places in that order. A `!python ...` subprocess of a
    notebook cannot read Colab secrets: read it in the notebook (`userdata.get("HF_TOKEN")`) and pass it
    as `token=`, or export it as HF_TOKEN first.
    """
    token = explicit.strip() if explicit else None
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token and in_colab():  # get_token skips Colab Enterprise and caches a refused prompt
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            token = userdata.get("HF_TOKEN")
        except Exception:  # noqa: BLE001 - no secret, or access refused: simply no token
            token = None
    protect_token(token)
    return token or None


# ---------------------------------------------------------------------------- errors, retries, repo ids


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: a 5xx/429 answer, a dropped or timed-out connection (not offline mode)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    try:
        import httpx2

        if isinstance(exc, httpx2.TransportError):
            return True
    except ImportError:
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def with_retries(call: Callable[[], T], what: str, level: int = logging.WARNING) -> T:
    """`call()`, retried after each delay in RETRY_DELAYS while it fails with a transient error.

    Each retry is logged at `level` (the checkpoint copier passes DEBUG: it reports a failure once itself).
    """
    for attempt in range(len(RETRY_DELAYS) + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == len(RETRY_DELAYS) or not is_transient(exc):
                raise
            delay = RETRY_DELAYS[attempt]
            log.log(level, "%s failed (%s); retrying in %.0f s", what, _one_line(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text[:200])


def hub_error(exc: Exception, repo_id: str, doing: str) -> UserError:
    """One clear UserError for a Hub failure (the token, the owner, the id, the network)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return UserError(f"{doing} {repo_id}: HF_HUB_OFFLINE=1 forbids the Hub; unset it and try again")
    if isinstance(exc, HFValidationError):
        return UserError(f"{doing}: {_one_line(exc)}")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(
            f"{doing} {repo_id}: that revision (branch, tag or commit) does not exist on the Hub"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(
            f"{doing} {repo_id}: the Hub has no such repo, or it is private and this token cannot see it; "
            "check the id and the token's account"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return UserError(f"{doing} {repo_id}: the Hub rejected the token (invalid or expired); {TOKEN_HELP}")
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return UserError(
            f"{doing} {repo_id}: the token may not write there (a read-only token, or a repo owned by "
            f"someone else); use a token with write access or a repo in your own namespace; {NOT_PUBLISHED}"
        )
    if is_transient(exc):
        return UserError(f"{doing} {repo_id}: network failure ({_one_line(exc)}); {NOT_PUBLISHED}")
    return UserError(f"{doing} {repo_id}: {_one_line(exc)}")


def check_repo_id(repo_id: str) -> None:
    """Raise UserError naming the rule a repo id breaks (huggingface_hub's own validation)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(
            f"repo id {repo_id!r} is invalid ({_one_line(exc)}): use 'your-name/adapter-name' with letters, "
            "digits, '-', '_' or '.'"
        ) from None


def _check_account(who: dict, namespace: str, repo_id: str) -> None:
    role = (who.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise UserError(
            f"cannot push to {repo_id}: the token is read-only; create a token with write access at "
            "https://huggingface.co/settings/tokens and set HF_TOKEN to it"
        )
    mine = [who.get("name")] + [org.get("name") for org in who.get("orgs") or []]
    if namespace not in mine:
        raise UserError(
            f"cannot push to {repo_id}: the namespace {namespace!r} is not yours (the token belongs to "
            f"{who.get('name')!r}, orgs: {', '.join(filter(None, mine[1:])) or 'none'}); "
            f"push to '{who.get('name')}/{repo_id.split('/')[-1]}' instead"
        )


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
        return json.loads((run_dir / "run_record.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{run_dir / 'run_record.json'} is not valid JSON ({exc}); re-run training") from None


def _upload_contents(run_dir: Path, card: str, base_id: str | None) -> dict[str, bytes]:
    """What goes up, by path in the repo: adapter, tokenizer, run record, loss plot and the card."""
    names = [*REQUIRED_FILES, *TOKENIZER_FILES, *OPTIONAL_FILES]
    contents = {name: (run_dir / name).read_bytes() for name in names if (run_dir / name).is_file()}
    config = json.loads(contents["adapter_config.json"])
    if base_id and config.get("base_model_name_or_path") != base_id:
        # A local base path would make AutoPeftModel look for a folder that exists only on the training machine.
        config["base_model_name_or_path"] = base_id
        contents["adapter_config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    contents["README.md"] = card.encode()
    return contents


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
        client = make_client(token)
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
        if token and token.encode() in data:
            raise UserError(f"{folder / name} contains your Hugging Face token: remove it; {NOT_PUBLISHED}")
    message = commit_message or default_commit_message(record)
    try:
        repo_url = _ensure_repo(client, repo_id, private)
        if revision and revision != "main":
            with_retries(lambda: client.create_branch(repo_id, revision), f"creating branch {revision}")
        operations = lambda: [CommitOperationAdd(p, data) for p, data in contents.items()]  # noqa: E731
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
    client: HubClient, repo_id: str, revision: str | None, contents: dict[str, bytes], commit_url: str
) -> None:
    """Check that the Hub lists every uploaded file with its size (and sha256 where it reports one)."""

    try:
        remote = with_retries(lambda: client.list_files(repo_id, revision=revision), "listing the upload")
    except Exception as exc:
        raise UserError(
            f"pushed {commit_url}, but listing {repo_id} to verify it failed ({_one_line(exc)}): check the files "
            "on the repo page, or run `qlora-lite push` again"
        ) from None
    wrong = [
        path
        for path, data in contents.items()
        if path not in remote
        or remote[path].size != len(data)
        or remote[path].sha256 not in (None, hashlib.sha256(data).hexdigest())
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
    client = client or make_client(resolve_token(token))
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
