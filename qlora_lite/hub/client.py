"""The one narrow wrapper around the Hub (`HubClient`), and the errors, retries and repo-id checks around it.

Everything that reaches the network goes through `HubClient`, the few `HfApi` methods qlora_lite uses; tests
swap it for a fake (tests/fake_hub.py) by replacing `make_client`. Push lives in `hub.push`, the token in
`hub.token`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from qlora_lite.errors import UserError
from qlora_lite.hub.token import TOKEN_HELP, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

NOT_PUBLISHED = "nothing was published; the local run is untouched; run `qlora-lite push` again"
RETRY_DELAYS: tuple[float, ...] = (2.0, 8.0, 30.0)  # seconds before each retry of a transient failure

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


# ---------------------------------------------------------------------- reading a model or data set


def unreachable(exc: BaseException) -> bool:
    """No answer from the Hub: a refused/dropped connection, a timeout, or a 5xx."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status is not None and status >= 500
    return is_transient(exc) or isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error, tokens redacted."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return redact(text[:200])


def read_error(exc: Exception, what: str, repo_id: str, revision: str | None, token: str | None) -> UserError:
    """One line for a failure to read `what` ("model" or "data set") `repo_id` from the Hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{'datasets/' if what == 'data set' else ''}{repo_id}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        who = "no token is set" if not token else "this token's account has not been granted access"
        return UserError(
            f"{what} {repo_id} is gated and {who}: accept its conditions at {page}, then set HF_TOKEN to a "
            "token of that account (or `hf auth login`, or the Colab secret HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return UserError(
            f"{what} {repo_id} has no revision {revision!r} (a branch, tag or commit sha) on the Hub"
        )
    if isinstance(exc, RepositoryNotFoundError):
        why = "no token is set" if not token else "the token cannot see it"
        return UserError(
            f"{what} {repo_id}: no such {what} on the Hub, or it is private and {why}; check the id, or set "
            "HF_TOKEN to a token that can read it"
        )
    if isinstance(exc, HFValidationError):
        return UserError(f"{what} {repo_id!r} is not a valid Hub id: {first_line(exc)}")
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return UserError(
            f"{what} {repo_id}: the Hub rejected the token (invalid or expired); set HF_TOKEN to a valid token"
        )
    if unreachable(exc):
        return UserError(
            f"{what} {repo_id}: cannot reach the Hub at {constants.ENDPOINT} ({first_line(exc)}); check the "
            "network connection"
        )
    return UserError(f"{what} {repo_id}: {first_line(exc)}")
