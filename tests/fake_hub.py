"""A recording stand-in for the Hugging Face Hub behind `qlora_lite.hub.client.HubClient`.

Repos live in a local folder: `<root>/repos/<namespace>/<name>/<branch>/<files>` plus `meta.json`
(owner, visibility, branches, commits). Commits are atomic (the branch folder is swapped whole).
Accounts are keyed by token; errors are the exact types huggingface_hub raises, built by its own
`hf_raise_for_status` from a synthetic HTTP response. `fail_next` injects failures (5xx, dropped
connections) into the next calls of a method.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import hf_raise_for_status

from qlora_lite.hub.client import RemoteFile

ENDPOINT = "https://hub.example"
LFS_MIN_SIZE = 1000  # files at least this big report an LFS sha256, as large files do on the Hub


def http_error(status: int, url: str, code: str | None = None) -> Exception:
    """The exception huggingface_hub raises for an HTTP answer `status` (and X-Error-Code `code`)."""
    headers = {"X-Error-Code": code} if code else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("POST", url))
    try:
        hf_raise_for_status(response)
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError(f"{status} did not raise")


class FakeHub:
    """The server side: accounts, repos, commits, injected failures and a log of every call."""

    def __init__(self, root: Path, accounts: dict[str, dict]) -> None:
        self.root = Path(root)
        self.accounts = accounts  # token -> {"name", "orgs": [..], "role": "write"|"read"}
        self.calls: list[tuple[str, str | None]] = []
        self.uploaded: list[bytes] = []  # every byte sent in an add operation, for token scans
        self._failures: dict[str, list[BaseException]] = {}

    # ---- test helpers
    def fail_next(self, method: str, exc: BaseException, times: int = 1) -> None:
        self._failures.setdefault(method, []).extend([exc] * times)

    def add_repo(self, repo_id: str, *, private: bool, files: dict[str, bytes] | None = None) -> None:
        folder = self._repo(repo_id)
        (folder / "main").mkdir(parents=True)
        self._write_meta(repo_id, {"private": private, "branches": ["main"], "commits": []})
        for path, data in (files or {}).items():
            (folder / "main" / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / "main" / path).write_bytes(data)

    def commits(self, repo_id: str) -> list[dict]:
        return self._meta(repo_id)["commits"]

    def private(self, repo_id: str) -> bool:
        return self._meta(repo_id)["private"]

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        tree = self._repo(repo_id) / branch
        return {
            p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()
        }

    def path(self, repo_id: str, branch: str, path: str) -> Path:
        return self._repo(repo_id) / branch / path

    # ---- storage
    def _repo(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def _meta(self, repo_id: str) -> dict:
        return json.loads((self._repo(repo_id) / "meta.json").read_text())

    def _write_meta(self, repo_id: str, meta: dict) -> None:
        (self._repo(repo_id) / "meta.json").write_text(json.dumps(meta, indent=1))

    def exists(self, repo_id: str) -> bool:
        return (self._repo(repo_id) / "meta.json").is_file()

    def record(self, method: str, repo_id: str | None) -> None:
        self.calls.append((method, repo_id))
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)


class FakeHubClient:
    """Implements HubClient's methods against a FakeHub, as the account of `token`."""

    def __init__(self, hub: FakeHub, token: str | None) -> None:
        self.hub = hub
        self.token = token
        self.endpoint = ENDPOINT

    def _account(self) -> dict:
        if not self.token:
            raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
        account = self.hub.accounts.get(self.token)
        if account is None:
            raise http_error(401, f"{ENDPOINT}/api/whoami-v2")
        return account

    def _namespaces(self) -> set[str]:
        account = self._account()
        return {account["name"], *account.get("orgs", [])}

    def _visible(self, repo_id: str) -> None:
        url = f"{ENDPOINT}/api/models/{repo_id}"
        if not self.hub.exists(repo_id):
            raise http_error(404, url, "RepoNotFound")
        if self.hub.private(repo_id) and repo_id.split("/")[0] not in self._namespaces():
            raise http_error(404, url, "RepoNotFound")

    def _writable(self, repo_id: str) -> None:
        if self._account()["role"] != "write" or repo_id.split("/")[0] not in self._namespaces():
            raise http_error(403, f"{ENDPOINT}/api/models/{repo_id}/commit")

    def _branch(self, repo_id: str, revision: str | None) -> Path:
        branch = revision or "main"
        if branch not in self.hub._meta(repo_id)["branches"]:
            raise http_error(404, f"{ENDPOINT}/api/models/{repo_id}/tree/{branch}", "RevisionNotFound")
        return self.hub._repo(repo_id) / branch

    # ---- HubClient's interface
    def whoami(self) -> dict:
        self.hub.record("whoami", None)
        account = self._account()
        return {
            "type": "user",
            "name": account["name"],
            "orgs": [{"name": org} for org in account.get("orgs", [])],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": account["role"]}},
        }

    def repo_private(self, repo_id: str) -> bool:
        self.hub.record("repo_private", repo_id)
        self._visible(repo_id)
        return self.hub.private(repo_id)

    def create_repo(self, repo_id: str, *, private: bool) -> str:
        self.hub.record("create_repo", repo_id)
        try:
            self._writable(repo_id)
        except Exception as denied:
            try:  # exist_ok=True: HfApi returns the URL when it can see the repo, else raises the 403
                self._visible(repo_id)
            except Exception:
                raise denied from None
            return f"{ENDPOINT}/{repo_id}"
        if not self.hub.exists(repo_id):
            self.hub.add_repo(repo_id, private=private)
        return f"{ENDPOINT}/{repo_id}"

    def create_branch(self, repo_id: str, branch: str) -> None:
        self.hub.record("create_branch", repo_id)
        self._visible(repo_id)
        self._writable(repo_id)
        meta = self.hub._meta(repo_id)
        if branch not in meta["branches"]:
            shutil.copytree(self.hub._repo(repo_id) / "main", self.hub._repo(repo_id) / branch)
            meta["branches"].append(branch)
            self.hub._write_meta(repo_id, meta)

    def create_commit(
        self, repo_id: str, operations: list, *, commit_message: str, revision: str | None = None
    ) -> str:
        self._visible(repo_id)
        self._writable(repo_id)
        tree = self._branch(repo_id, revision)
        staged = {}
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                with op.as_file() as handle:
                    staged[op.path_in_repo] = handle.read()
                self.hub.uploaded.append(staged[op.path_in_repo])
        self.hub.record("create_commit", repo_id)  # an injected failure here: data sent, nothing committed
        work = tree.with_name(f".{tree.name}-{uuid.uuid4().hex}")
        shutil.copytree(tree, work)
        try:
            for op in operations:
                target = work / op.path_in_repo
                if isinstance(op, CommitOperationDelete):
                    if not target.exists():
                        url = f"{ENDPOINT}/api/models/{repo_id}/commit"
                        raise http_error(404, url, "EntryNotFound")
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(staged[op.path_in_repo])
            for folder in sorted((p for p in work.rglob("*") if p.is_dir()), reverse=True):
                if not any(folder.iterdir()):
                    folder.rmdir()  # git has no empty folders
            old = tree.with_name(f".{tree.name}-old-{uuid.uuid4().hex}")
            tree.rename(old)
            work.rename(tree)
            shutil.rmtree(old)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        oid = uuid.uuid4().hex
        meta = self.hub._meta(repo_id)
        paths = [op.path_in_repo for op in operations]
        meta["commits"].append(
            {"oid": oid, "revision": revision or "main", "message": commit_message, "paths": paths}
        )
        self.hub._write_meta(repo_id, meta)
        return f"{ENDPOINT}/{repo_id}/commit/{oid}"

    def list_files(
        self, repo_id: str, *, revision: str | None = None, prefix: str | None = None
    ) -> dict[str, RemoteFile]:
        self.hub.record("list_files", repo_id)
        self._visible(repo_id)
        tree = self._branch(repo_id, revision)
        base = tree / prefix if prefix else tree
        if not base.exists():
            raise http_error(404, f"{ENDPOINT}/api/models/{repo_id}/tree/{prefix}", "EntryNotFound")
        found = {}
        for path in sorted(base.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                sha = hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN_SIZE else None
                found[path.relative_to(tree).as_posix()] = RemoteFile(len(data), sha)
        return found

    def snapshot_download(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        allow_patterns: list[str] | None = None,
        local_dir=None,
    ) -> Path:
        self.hub.record("snapshot_download", repo_id)
        self._visible(repo_id)
        tree = self._branch(repo_id, revision)
        target = (
            Path(local_dir)
            if local_dir
            else self.hub.root / "cache" / repo_id.replace("/", "--") / uuid.uuid4().hex
        )
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree).as_posix()
            if path.is_file() and (
                allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns)
            ):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / rel)
        target.mkdir(parents=True, exist_ok=True)
        return target
