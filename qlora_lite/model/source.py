"""Where a base model comes from: a local folder, or a Hub id `org/name[@revision]` pinned to one commit.

`resolve_model_source` fetches `config.json` alone through huggingface_hub (no weights), so the planner can
predict memory before anything large is downloaded; the revision (a branch, tag or commit) is resolved to the
commit sha, which the run record keeps and every later download uses. Every way this can fail for a user (no
such repo, a gated repo without access, no network or offline mode, a repo without config.json) is one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.hub.client import first_line, read_error, unreachable

log = logging.getLogger(__name__)

CONFIG = "config.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelSource:
    """A base model as training and inference load it: `name` goes to `from_pretrained` with `revision`."""

    name: str  # the local folder, or the Hub id
    config_path: Path  # config.json on this machine (for a Hub model: in the Hugging Face cache)
    hub_id: str | None = None
    revision: str | None = None  # the commit sha of a Hub model (None for a folder)
    requested_revision: str | None = None  # what the user asked for: a branch, tag or commit (None: main)
    license: str | None = None  # from the repo's model card, when it says

    @property
    def on_hub(self) -> bool:
        return self.hub_id is not None

    @property
    def display_name(self) -> str:
        return self.hub_id or Path(self.name).name

    def pretrained_kwargs(self) -> dict[str, str]:
        """What `from_pretrained(self.name, **kwargs)` needs: the pinned commit of a Hub model."""
        return {"revision": self.revision} if self.revision else {}


def split_revision(model: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); anything without '@' -> (model, None)."""
    name, sep, revision = str(model).rpartition("@")
    if sep and name and revision and "/" not in revision:
        return name, revision
    return str(model), None


def looks_like_hub_id(text: str) -> bool:
    """`name` or `org/name` (letters, digits, '-', '_', '.'); paths start with '.', '/' or '~'."""
    name, _ = split_revision(text)
    return not name.startswith((".", "/", "~")) and re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) is not None


def resolve_model_source(
    model: str | os.PathLike | ModelSource, revision: str | None = None, token: str | None = None
) -> ModelSource:
    """A local folder holding config.json, or a Hub id (optionally `@revision`) resolved to its commit."""
    if isinstance(model, ModelSource):
        return model
    text = os.fspath(model) if isinstance(model, os.PathLike) else str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise UserError(
                f"model folder {path} has no config.json: point --model at a Hugging Face model folder"
            )
        return ModelSource(name=str(path), config_path=path / CONFIG)
    if path.is_file() and path.name.endswith(".json"):  # a bare config.json: enough to plan
        return ModelSource(name=str(path.parent), config_path=path)
    if not looks_like_hub_id(text):
        raise UserError(
            f"model {text!r} not found: it is not a local folder, nor a Hub id; give a folder holding "
            "config.json or a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct' (optionally '@revision')"
        )
    hub_id, in_name = split_revision(text)
    return _from_hub(hub_id, revision or in_name, token)


def _from_hub(hub_id: str, revision: str | None, token: str | None) -> ModelSource:
    from huggingface_hub import constants

    if token is None:
        from qlora_lite.hub.token import resolve_token

        token = resolve_token()
    if constants.is_offline_mode():
        cached = _cached(hub_id, revision)
        if cached is None:
            raise UserError(
                f"model {hub_id}: offline mode (HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache; "
                "unset HF_HUB_OFFLINE to download it, or give a local folder"
            )
        return cached
    try:
        return _fetch(hub_id, revision, token)
    except UserError:
        raise
    except Exception as exc:
        if not unreachable(exc):
            raise read_error(exc, "model", hub_id, revision, token) from None
        cached = _cached(hub_id, revision)
        if cached is not None:
            log.warning("the Hub is unreachable (%s): using %s from the local cache", first_line(exc), hub_id)
            return cached
        raise UserError(
            f"model {hub_id}: cannot reach the Hub at {constants.ENDPOINT} ({first_line(exc)}); check the "
            "network connection, or give a local folder"
        ) from None


def _fetch(hub_id: str, revision: str | None, token: str | None) -> ModelSource:
    """Repo info (commit sha, files, card) then config.json alone, pinned to that commit."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(hub_id, revision=revision, token=token)
    files = {sibling.rfilename for sibling in info.siblings or []}
    if CONFIG not in files:
        raise UserError(_no_config(hub_id, files, info))
    # By the name the user gave (the cache then maps it to the commit, for offline re-runs); the snapshot
    # folder it lands in is named after the commit the Hub served (X-Repo-Commit).
    config_path = Path(hf_hub_download(hub_id, CONFIG, revision=revision, token=token))
    commit = config_path.parent.name if _COMMIT.fullmatch(config_path.parent.name) else info.sha
    card = info.card_data
    license_name = getattr(card, "license", None) if card is not None else None
    log.info("model %s: commit %s%s", hub_id, commit, f" (revision {revision})" if revision else "")
    return ModelSource(
        name=hub_id,
        config_path=config_path,
        hub_id=hub_id,
        revision=commit,
        requested_revision=revision,
        license=license_name if isinstance(license_name, str) else None,
    )


def _cached(hub_id: str, revision: str | None) -> ModelSource | None:
    """config.json of `hub_id` at `revision` from the local cache (its folder name is the commit sha)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, CONFIG, revision=revision)
    if not isinstance(found, str):
        return None
    commit = Path(found).parent.name
    return ModelSource(
        name=hub_id,
        config_path=Path(found),
        hub_id=hub_id,
        revision=commit if _COMMIT.fullmatch(commit) else revision,
        requested_revision=revision,
    )


def _no_config(hub_id: str, files: set[str], info) -> str:
    if "adapter_config.json" in files:
        return (
            f"model {hub_id} is a LoRA adapter, not a base model (no config.json, an adapter_config.json); "
            "give its base model as --model"
        )
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    hint = f" (it holds GGUF files such as {ggufs[0]}: use the original transformers model)" if ggufs else ""
    return (
        f"model {hub_id} on the Hub has no config.json, so it is not a transformers model{hint}; "
        "give the id of a transformers model repo"
    )


def read_config(source: ModelSource) -> dict:
    return json.loads(source.config_path.read_text())
