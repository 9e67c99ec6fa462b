"""The Hub as a durable place for checkpoints: resume a Colab run on a fresh VM without Google Drive.

    store = CheckpointStore(out / "checkpoints", backend=backend_from_spec("hf://me/my-run-ckpt"))

Layout: checkpoint `checkpoint-000120` lives under `checkpoints/checkpoint-000120/` on the branch
`checkpoints` of a private model repo, so `main` stays free for the published adapter. One checkpoint
is one commit (its files and manifest.json together), so a half-uploaded checkpoint never shows; a
rotated-out checkpoint is deleted in one commit too. The store runs uploads in its background copier,
which reports failures once and retries: training never waits on the network.

Deleted checkpoints stay in the branch's git history (and count towards the repo's storage) until the
branch is squashed (`HfApi.super_squash_history(repo_id, branch="checkpoints")`) or deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from qlora_lite.checkpoint.durable import DurableBackend, read_manifest_file
from qlora_lite.checkpoint.manifest import MANIFEST, step_of
from qlora_lite.checkpoint.store import STAGING
from qlora_lite.errors import UserError
from qlora_lite.hub import client as hub
from qlora_lite.hub.client import HubClient, _one_line, check_repo_id, hub_error, with_retries
from qlora_lite.hub.token import resolve_token

log = logging.getLogger(__name__)

SCHEME = "hf://"
DEFAULT_BRANCH = "checkpoints"
PREFIX = "checkpoints"


class HubBackend(DurableBackend):
    """Checkpoints in a private Hub repo, under `<prefix>/<name>/` on branch `branch`."""

    def __init__(
        self,
        repo_id: str,
        client: HubClient,
        *,
        branch: str = DEFAULT_BRANCH,
        prefix: str = PREFIX,
        private: bool = True,
        allow_public: bool = False,
    ) -> None:
        check_repo_id(repo_id)
        self.repo_id = repo_id
        self.client = client
        self.branch = branch
        self.prefix = prefix.strip("/")
        self.private = private
        self.allow_public = allow_public
        self.description = f"{SCHEME}{repo_id}@{branch}"
        self._ready = False

    def _folder(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _ensure_repo(self) -> None:
        """Create the private repo and the branch on first use (an existing repo keeps its visibility)."""
        if self._ready:
            return
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            private = with_retries(
                lambda: self.client.repo_private(self.repo_id),
                f"looking up {self.repo_id}",
                logging.DEBUG,
            )
            if not private:
                self._public()
        except RepositoryNotFoundError:
            with_retries(
                lambda: self.client.create_repo(self.repo_id, private=self.private),
                f"creating {self.repo_id}",
                logging.DEBUG,
            )
        with_retries(
            lambda: self.client.create_branch(self.repo_id, self.branch),
            f"creating {self.branch}",
            logging.DEBUG,
        )
        self._ready = True

    def _public(self) -> None:
        if not self.allow_public:
            raise UserError(
                f"{self.repo_id} is a PUBLIC repo: checkpoints pushed there (adapter, optimizer, run settings) "
                "would be visible to everyone; use a private repo, or pass public_checkpoints=True "
                "(--public-checkpoints) to push them there anyway"
            )
        log.warning("%s is PUBLIC: its checkpoints are visible to everyone", self.repo_id)

    def check_visibility(self) -> None:
        """At the start of a run: refuse a public repo unless allowed (a missing repo is created private)."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            private = with_retries(
                lambda: self.client.repo_private(self.repo_id), f"looking up {self.repo_id}", logging.DEBUG
            )
        except RepositoryNotFoundError:
            return
        except Exception as exc:
            raise UserError(
                f"cannot list the checkpoints in {self.description} ({_one_line(exc)}), so this run cannot tell "
                "whether it should continue from there: check the token (HF_TOKEN, `hf auth login`) and the "
                "connection and run again, or pass resume='local' (--resume local) to continue from this "
                "machine's checkpoints on purpose"
            ) from None
        if not private:
            self._public()

    def _remote(self, folder: str | None = None) -> dict:
        """Files under `folder` (default: all checkpoints) on the branch; {} when there is nothing yet."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            return with_retries(
                lambda: self.client.list_files(
                    self.repo_id, revision=self.branch, prefix=folder or self.prefix
                ),
                f"listing {self.description}",
                logging.DEBUG,
            )
        except (RevisionNotFoundError, EntryNotFoundError):
            return {}
        except RepositoryNotFoundError:
            if self._ready:
                raise
            # A first run (upload() creates the repo), unless the token is refused: the Hub answers a private
            # repo's listing with "not found" for an expired token too, and that must not look like no checkpoints.
            with_retries(self.client.whoami, "checking the token", logging.DEBUG)
            return {}

    def upload(self, local_dir: Path, name: str) -> None:
        """Push one verified checkpoint as one commit, then check the Hub lists every file at its size."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        manifest_bytes = (local_dir / MANIFEST).read_bytes()
        manifest = json.loads(manifest_bytes)
        wanted = {f"{self._folder(name)}/{f}": entry for f, entry in manifest["files"].items()}
        # With its digest too: the Hub reports a sha256 for every LFS file, and a missing one must not read as
        # a mismatch (it did, and every copy was retried until the run's end).
        wanted[f"{self._folder(name)}/{MANIFEST}"] = {
            "size": len(manifest_bytes),
            "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        }
        try:
            self._ensure_repo()
            there = self._remote(self._folder(name))
            stale = [path for path in there if path not in wanted]
            if f"{self._folder(name)}/{MANIFEST}" in there:  # never replace another run's checkpoint
                other = (self.manifest(name) or {}).get("run_id")
                if other not in (None, manifest.get("run_id")):
                    raise OSError(errno.EEXIST, f"{name} there belongs to another run (run id {other})")

            def operations() -> list:
                ops: list = [CommitOperationDelete(path) for path in stale]
                ops += [
                    CommitOperationAdd(f"{self._folder(name)}/{f}", local_dir / f) for f in manifest["files"]
                ]
                return ops + [CommitOperationAdd(f"{self._folder(name)}/{MANIFEST}", local_dir / MANIFEST)]

            with_retries(
                lambda: self.client.create_commit(
                    self.repo_id, operations(), commit_message=f"qlora_lite: {name}", revision=self.branch
                ),
                f"uploading {name} to {self.description}",
                logging.DEBUG,
            )
            remote = self._remote(self._folder(name))
        except UserError:
            raise
        except Exception as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
                raise hub_error(exc, self.repo_id, f"cannot upload {name} to") from exc
            raise
        for path, entry in wanted.items():
            found = remote.get(path)
            if (
                found is None
                or found.size != entry["size"]
                or (found.sha256 and found.sha256 != entry.get("sha256"))
            ):
                raise OSError(
                    errno.EIO, f"{path} on {self.description} does not match the manifest after upload"
                )

    def list(self) -> list[str]:
        names = {path[len(self.prefix) + 1 :].split("/", 1)[0] for path in self._remote()}
        return sorted(name for name in names if step_of(name) is not None)

    def fetch(self, name: str, dest: Path) -> None:
        """Download checkpoint `name` into the new folder `dest` (the store verifies it afterwards)."""
        # Named like the store's staging folders, so a fetch killed midway is cleaned up as one of them.
        tmp = dest.parent / f"{STAGING}hubfetch-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with_retries(
                lambda: self.client.snapshot_download(
                    self.repo_id,
                    revision=self.branch,
                    allow_patterns=[f"{self._folder(name)}/*"],
                    local_dir=tmp,
                ),
                f"downloading {name} from {self.description}",
                logging.DEBUG,
            )
            source = tmp / self._folder(name)
            if not source.is_dir():
                raise FileNotFoundError(errno.ENOENT, f"{name} is not on {self.description}")
            os.rename(source, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def manifest(self, name: str) -> dict | None:
        """Checkpoint `name`'s manifest.json alone (rotation reads which run wrote it)."""
        tmp = Path(tempfile.mkdtemp(prefix="qlora-lite-manifest-"))
        try:
            with_retries(
                lambda: self.client.snapshot_download(
                    self.repo_id,
                    revision=self.branch,
                    allow_patterns=[f"{self._folder(name)}/{MANIFEST}"],
                    local_dir=tmp,
                ),
                f"reading {name}'s manifest on {self.description}",
                logging.DEBUG,
            )
            return read_manifest_file(tmp / self._folder(name) / MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def archive(self, names: list[str], label: str) -> str:
        """Move checkpoints to `<label>/<name>/` on the same branch, in one commit (kept, no longer listed)."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        tmp = Path(tempfile.mkdtemp(prefix="qlora-lite-archive-"))
        try:
            with_retries(
                lambda: self.client.snapshot_download(
                    self.repo_id,
                    revision=self.branch,
                    allow_patterns=[f"{self._folder(name)}/*" for name in names],
                    local_dir=tmp,
                ),
                f"downloading the checkpoints to move aside from {self.description}",
                logging.DEBUG,
            )
            ops: list = []
            for name in names:
                source = tmp / self._folder(name)
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    ops.append(
                        CommitOperationAdd(f"{label}/{name}/{path.relative_to(source).as_posix()}", path)
                    )
                ops.append(CommitOperationDelete(f"{self._folder(name)}/"))
            with_retries(
                lambda: self.client.create_commit(
                    self.repo_id,
                    ops,
                    commit_message=f"qlora_lite: move {len(names)} checkpoints to {label}",
                    revision=self.branch,
                ),
                f"moving checkpoints aside on {self.description}",
                logging.DEBUG,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return f"{self.description}/{label}"

    def delete(self, name: str) -> None:
        """Remove every file of checkpoint `name` in one commit."""
        from huggingface_hub import CommitOperationDelete

        if not self._remote(self._folder(name)):
            return
        with_retries(
            lambda: self.client.create_commit(
                self.repo_id,
                [CommitOperationDelete(f"{self._folder(name)}/")],
                commit_message=f"qlora_lite: remove {name}",
                revision=self.branch,
            ),
            f"removing {name} from {self.description}",
            logging.DEBUG,
        )


def backend_from_spec(
    spec: str, token: str | None = None, client: HubClient | None = None, *, allow_public: bool = False
) -> DurableBackend | None:
    """`hf://user/repo` or `hf://user/repo@branch` -> a HubBackend; anything else -> None (a folder)."""
    if not str(spec).startswith(SCHEME):
        return None
    repo_id, _, branch = str(spec)[len(SCHEME) :].strip("/").partition("@")
    if "/" not in repo_id:
        raise UserError(f"checkpoint place {spec!r}: write hf://your-name/repo-name[@branch]")
    check_repo_id(repo_id)
    if client is None:
        token = resolve_token(token)
        if not token:
            raise UserError(
                f"checkpoints to {spec} need a Hugging Face token with write access: set HF_TOKEN, run "
                "`hf auth login`, or in Colab pass token=userdata.get('HF_TOKEN')"
            )
        client = hub.make_client(token)  # looked up at call time: tests replace it
    return HubBackend(repo_id, client, branch=branch or DEFAULT_BRANCH, allow_public=allow_public)
