"""A local HTTP stand-in of the Hugging Face Hub, for tests that run the real huggingface_hub / datasets code.

A real HTTP server on 127.0.0.1 (an ephemeral port) answers the endpoints those libraries call: whoami, repo
info (with `sha`, `siblings`, `cardData`), `tree/{rev}/{path}` (directories, `recursive`), `paths-info`,
`resolve/{rev}/{file}` (HEAD and GET, `ETag`, `X-Repo-Commit`, ranges), preupload (every file is "regular":
no LFS, no Xet), commit (NDJSON), branches, tags, refs, commits, create/delete repo, validate-yaml. Models and
data sets alike. Repos keep every commit, so a revision can be a branch, a tag or a commit sha.

Access follows the Hub: a private repo is visible only to tokens of its namespace (else 404 RepoNotFound, 401
without a token); a gated repo lists its files to anyone but serves them only to tokens granted access (else
401/403 GatedRepo); writing needs a write token of the namespace. Errors carry the `X-Error-Code` headers
huggingface_hub turns into its own exception types.

    server = HubServer(accounts={"tok-alice": {"name": "alice"}})
    server.add_repo("org/tiny", {"config.json": b"{...}"})           # returns the commit sha
    with server.serving(monkeypatch, cache_dir=tmp_path / "hf"):      # HF_ENDPOINT, offline off, fresh cache
        huggingface_hub.hf_hub_download("org/tiny", "config.json")

The pytest fixture `hub_server` (tests/conftest.py) gives a started server with the environment pointed at it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_ACCOUNTS = {"tok-user": {"name": "user", "orgs": ["org"], "role": "write"}}
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file's bytes (what the Hub reports as `oid` / `blobId` / ETag of non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    parent: str | None
    message: str
    created: float


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    gated: bool | str = False  # False, "auto" or "manual"
    granted: set[str] = field(default_factory=set)  # account names with access to a gated repo
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{40}", revision):
            sha = revision if revision in self.commits else None
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "") -> None:
        super().__init__(message or code or str(status))
        self.status, self.code, self.message = status, code, message or (code or "error")


class HubServer:
    """The Hub's state (accounts, repos, commits) plus the HTTP server that serves it."""

    def __init__(self, accounts: dict[str, dict] | None = None) -> None:
        self.accounts = dict(DEFAULT_ACCOUNTS if accounts is None else accounts)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.offline = False  # True: every request is answered 503 (a Hub that is down)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ test helpers: state
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool | str = False,
        message: str = "initial commit",
    ) -> str:
        """Create a repo with one commit holding `files` on `main`; returns that commit's sha."""
        with self._lock:
            repo = Repo(repo_id, repo_type, private=private, gated=gated)
            self.repos[(repo_type, repo_id)] = repo
            return self._commit(repo, "main", _as_bytes(files or {}), (), message)

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes | str] | None = None,
        *,
        repo_type: str = "model",
        branch: str = "main",
        delete: tuple[str, ...] = (),
        message: str = "update",
    ) -> str:
        """Commit changes on `branch` (files added/replaced, paths deleted); returns the new commit sha."""
        with self._lock:
            return self._commit(
                self.repo(repo_id, repo_type), branch, _as_bytes(files or {}), delete, message
            )

    def add_folder(self, repo_id: str, folder: str | Path, *, repo_type: str = "model", **kwargs: Any) -> str:
        """A repo holding every file of a local folder (a model saved with save_pretrained, say)."""
        root = Path(folder)
        files = {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
        return self.add_repo(repo_id, files, repo_type=repo_type, **kwargs)

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> None:
        repo = self.repo(repo_id, repo_type)
        repo.tags[tag] = repo.resolve(revision).sha

    def grant(self, repo_id: str, account: str, *, repo_type: str = "model") -> None:
        """Give `account` access to a gated repo (as accepting its conditions on the Hub would)."""
        self.repo(repo_id, repo_type).granted.add(account)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        return dict(self.repo(repo_id, repo_type).resolve(revision).files)

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        return self.repo(repo_id, repo_type).branches[branch]

    def _commit(self, repo: Repo, branch: str, added: dict[str, bytes], deleted, message: str) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            files = {p: d for p, d in files.items() if p != path.rstrip("/") and not p.startswith(prefix)}
        files.update(added)
        sha = hashlib.sha1(f"{repo.repo_id}{parent}{uuid.uuid4()}".encode()).hexdigest()
        repo.commits[sha] = Commit(sha, files, parent, message, time.time())
        repo.branches[branch] = sha
        return sha

    # ------------------------------------------------------------------ test helpers: serving
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @contextlib.contextmanager
    def serving(self, monkeypatch, cache_dir: str | Path) -> Iterator[HubServer]:
        """Point huggingface_hub, transformers and datasets at this server (online, a fresh cache)."""
        if self._httpd is None:
            self.start()
        point_libraries_at(self.url, monkeypatch, cache_dir)
        try:
            yield self
        finally:
            self.stop()

    # ------------------------------------------------------------------ access rules
    def account(self, token: str | None) -> dict | None:
        if token is None:
            return None
        if token not in self.accounts:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return self.accounts[token]

    def readable(self, repo_type: str, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        account = self.account(token)
        if repo is None or (repo.private and not _owns(account, repo.namespace)):
            raise HubError(401 if account is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def downloadable(self, repo: Repo, token: str | None) -> None:
        account = self.account(token)
        if repo.gated and not (
            account and (account["name"] in repo.granted or _owns(account, repo.namespace))
        ):
            raise HubError(401 if account is None else 403, "GatedRepo", "Access to this repo is restricted")

    def writable(self, namespace: str, token: str | None) -> dict:
        account = self.account(token)
        if account is None:
            raise HubError(401, None, "You must be authenticated to write")
        if account.get("role", "write") != "write" or not _owns(account, namespace):
            raise HubError(403, None, "You don't have the rights to write in this namespace")
        return account

    def revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        return commit


def _owns(account: dict | None, namespace: str) -> bool:
    return account is not None and namespace in [account["name"], *account.get("orgs", [])]


def _as_bytes(files: dict[str, bytes | str]) -> dict[str, bytes]:
    return {path: data.encode() if isinstance(data, str) else bytes(data) for path, data in files.items()}


def point_libraries_at(url: str, monkeypatch, cache_dir: str | Path) -> None:
    """Online mode with HF_ENDPOINT=url for this test: env vars plus the constants the libraries read at import."""
    import datasets.config
    import huggingface_hub.constants as hf_constants

    cache = Path(cache_dir)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(cache / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(cache / "stored_tokens"))
    import huggingface_hub.hf_api

    # The module-level helpers (huggingface_hub.file_exists, model_info, ...) share one HfApi made at import.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    import transformers.utils.hub

    # transformers keeps its own HfApi, made (with the endpoint of the moment) on first use: make it anew.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)  # no datasets-server in tests
    try:  # fsspec caches file systems per arguments: a new server must not get the last test's instance
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------- HTTP

_REPO = r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p + r"\Z"), name)
    for m, p, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", "info"),
        ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", _REPO + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", _REPO + r"/refs", "refs"),
        ("GET", _REPO + r"/commits/(?P<rev>[^/]+)", "commits"),
        ("POST", _REPO + r"/branch/(?P<branch>.+)", "create_branch"),
        ("DELETE", _REPO + r"/branch/(?P<branch>.+)", "delete_branch"),
        ("POST", _REPO + r"/tag/(?P<rev>[^/]+)", "create_tag"),
        (
            "GET",
            r"(?P<prefix>/datasets|/spaces)?/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
        (
            "HEAD",
            r"(?P<prefix>/datasets|/spaces)?/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect; every answer has a Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---- plumbing
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()
        self.hub.requests.append((method, split.path))
        auth = self.headers.get("Authorization", "")
        self.token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        try:
            if self.hub.offline:
                raise HubError(503, None, "Service Unavailable")
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(split.path)
                if route_method == method and match:
                    with self.hub._lock:
                        getattr(self, "_" + name)(**{k: v for k, v in match.groupdict().items()})
                    return
            raise HubError(404, None, f"no route for {method} {split.path}")
        except HubError as exc:
            self._send(
                exc.status, {"error": exc.message}, {"X-Error-Code": exc.code, "X-Error-Message": exc.message}
            )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: Any, headers: dict[str, str | None] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            if value is not None:
                self.send_header(name, value)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self) -> Any:
        return json.loads(self.body or b"{}")

    def _repo(self, t: str, repo: str) -> Repo:
        return self.hub.readable(REPO_TYPES[t], unquote(repo), self.token)

    # ---- account and repos
    def _whoami(self) -> None:
        account = self.hub.account(self.token)
        if account is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        self._send(
            200,
            {
                "type": "user",
                "name": account["name"],
                "orgs": [{"name": org} for org in account.get("orgs", [])],
                "auth": {"type": "access_token", "accessToken": {"role": account.get("role", "write")}},
            },
        )

    def _validate_yaml(self) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        spec = self._json()
        repo_type = spec.get("type") or "model"
        namespace = spec.get("organization") or (self.hub.account(self.token) or {}).get("name", "")
        repo_id = f"{namespace}/{spec['name']}"
        self.hub.writable(namespace, self.token)
        url = f"{self.hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            raise HubError(409, None, "You already created this repo")
        private = spec.get("visibility", "private" if spec.get("private") else "public") != "public"
        repo = Repo(repo_id, repo_type, private=private)
        self.hub.repos[(repo_type, repo_id)] = repo
        self.hub._commit(
            repo, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, (), "initial commit"
        )
        self._send(200, {"url": url, "name": repo_id})

    def _delete_repo(self) -> None:
        spec = self._json()
        repo_type = spec.get("type") or "model"
        namespace = spec.get("organization") or (self.hub.account(self.token) or {}).get("name", "")
        self.hub.writable(namespace, self.token)
        if self.hub.repos.pop((repo_type, f"{namespace}/{spec['name']}"), None) is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        self._send(200, {})

    def _info(self, t: str, repo: str, rev: str | None = None) -> None:
        the_repo = self._repo(t, repo)
        commit = self.hub.revision(the_repo, rev or "main")
        card = _card_data(commit.files.get("README.md"))
        when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created))
        info = {
            "_id": hashlib.md5(the_repo.repo_id.encode()).hexdigest()[:24],
            "id": the_repo.repo_id,
            "author": the_repo.namespace,
            "sha": commit.sha,
            "private": the_repo.private,
            "gated": the_repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [f"license:{card['license']}"] if card.get("license") else [],
            "createdAt": when,
            "lastModified": when,
            "cardData": card or None,
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_sha(data)}
                for path, data in sorted(commit.files.items())
            ],
        }
        if the_repo.repo_type == "model":
            info.update(
                modelId=the_repo.repo_id,
                pipeline_tag=card.get("pipeline_tag"),
                library_name=card.get("library_name"),
            )
            if "config.json" in commit.files:
                with contextlib.suppress(ValueError):
                    config = json.loads(commit.files["config.json"])
                    info["config"] = {
                        k: config.get(k) for k in ("architectures", "model_type") if k in config
                    }
        self._send(200, info)

    # ---- files
    def _entries(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, "EntryNotFound", f"{path} does not exist")
        entries: dict[str, dict] = {}
        for file_path, data in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders between `prefix` and the file
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "path": folder, "oid": git_blob_sha(folder.encode()), "size": 0},
                )
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[file_path] = _file_entry(file_path, data)
        return list(entries.values())

    def _tree(self, t: str, repo: str, rev: str, path: str | None = None) -> None:
        commit = self.hub.revision(self._repo(t, repo), rev)
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        self._send(200, self._entries(commit, unquote(path or ""), recursive))

    def _paths_info(self, t: str, repo: str, rev: str) -> None:
        commit = self.hub.revision(self._repo(t, repo), rev)
        form = parse_qs(self.body.decode())
        if "paths" not in form and self.body.startswith(b"{"):
            form = {"paths": self._json().get("paths", [])}
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(_file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files) or path == "":
                out.append({"type": "directory", "path": path, "oid": git_blob_sha(path.encode()), "size": 0})
        self._send(200, out)

    def _resolve(self, repo: str, rev: str, path: str, prefix: str | None = None) -> None:
        repo_type = {"/datasets": "dataset", "/spaces": "space"}.get(prefix or "", "model")
        the_repo = self.hub.readable(repo_type, unquote(repo), self.token)
        self.hub.downloadable(the_repo, self.token)
        commit = self.hub.revision(the_repo, rev)
        headers = {"X-Repo-Commit": commit.sha}
        data = commit.files.get(unquote(path))
        if data is None:
            self._send(
                404,
                {"error": "Entry not found"},
                {**headers, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
            )
            return
        headers["ETag"] = f'"{git_blob_sha(data)}"'
        headers["Accept-Ranges"] = "bytes"
        headers["Last-Modified"] = formatdate(commit.created, usegmt=True)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and data:
            start = int(match[1]) if match[1] else max(0, len(data) - int(match[2]))
            end = min(len(data) - 1, int(match[2])) if match[1] and match[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers)
            return
        self._send(200, data, headers)

    # ---- writing
    def _writable_repo(self, t: str, repo: str) -> Repo:
        the_repo = self._repo(t, repo)
        self.hub.writable(the_repo.namespace, self.token)
        return the_repo

    def _preupload(self, t: str, repo: str, rev: str) -> None:
        the_repo = self._writable_repo(t, repo)
        commit = the_repo.resolve(unquote(rev))
        files = []
        for spec in self._json().get("files", []):
            existing = commit.files.get(spec["path"]) if commit else None
            files.append(
                {
                    "path": spec["path"],
                    "uploadMode": "regular",  # never LFS / Xet: content travels inline in the commit
                    "shouldIgnore": False,
                    "oid": git_blob_sha(existing) if existing is not None else None,
                }
            )
        self._send(200, {"files": files, "commitOid": commit.sha if commit else None})

    def _commit(self, t: str, repo: str, rev: str) -> None:
        the_repo = self._writable_repo(t, repo)
        branch = unquote(rev)
        if branch not in the_repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        message = ""
        for line in self.body.split(b"\n"):
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != the_repo.branches[branch]:
                    raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(
                    400, None, f"the stand-in Hub does not support {key!r} (uploads are regular files)"
                )
        sha = self.hub._commit(the_repo, branch, added, tuple(deleted), message)
        prefix = "" if the_repo.repo_type == "model" else the_repo.repo_type + "s/"
        url = f"{self.hub.url}/{prefix}{the_repo.repo_id}/commit/{sha}"
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _create_branch(self, t: str, repo: str, branch: str) -> None:
        the_repo = self._writable_repo(t, repo)
        branch = unquote(branch)
        if branch in the_repo.branches:
            raise HubError(409, None, f"Branch {branch} already exists")
        start = self._json().get("startingPoint") or "main"
        the_repo.branches[branch] = self.hub.revision(the_repo, start).sha
        self._send(200, {})

    def _delete_branch(self, t: str, repo: str, branch: str) -> None:
        the_repo = self._writable_repo(t, repo)
        if the_repo.branches.pop(unquote(branch), None) is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {unquote(branch)}")
        self._send(200, {})

    def _create_tag(self, t: str, repo: str, rev: str) -> None:
        the_repo = self._writable_repo(t, repo)
        the_repo.tags[self._json()["tag"]] = self.hub.revision(the_repo, rev).sha
        self._send(200, {})

    def _refs(self, t: str, repo: str) -> None:
        the_repo = self._repo(t, repo)
        ref = lambda kind, name, sha: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}  # noqa: E731
        self._send(
            200,
            {
                "branches": [ref("heads", n, s) for n, s in the_repo.branches.items()],
                "tags": [ref("tags", n, s) for n, s in the_repo.tags.items()],
                "converts": [],
            },
        )

    def _commits(self, t: str, repo: str, rev: str) -> None:
        the_repo = self._repo(t, repo)
        commit: Commit | None = self.hub.revision(the_repo, rev)
        out = []
        while commit is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created))
            out.append(
                {"id": commit.sha, "title": commit.message, "message": "", "authors": [], "date": when}
            )
            commit = the_repo.commits.get(commit.parent) if commit.parent else None
        self._send(200, out)


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}


def _card_data(readme: bytes | None) -> dict:
    """The YAML front matter of a README.md (what the Hub returns as `cardData`)."""
    if not readme:
        return {}
    match = re.match(rb"---\n(.*?)\n---", readme, re.S)
    if not match:
        return {}
    import yaml

    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
