"""Training data from a data set on the Hub: `org/name[@revision]`, a config and a split.

The id is resolved to a commit first (one repo-info call), then `datasets.load_dataset` reads that commit, so
the records and the commit the run record names are the same. The records then go through the same format
detection as a local file. Failures a user can cause (no such data set, gated, a config or split that does
not exist, offline, no network) are one line each.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.hub.client import first_line, read_error

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")


@dataclass(frozen=True)
class HubDataset:
    """A data set on the Hub. `revision` is what the user asked for; `commit` is set once resolved."""

    repo_id: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> dict[str, Any]:
        """What the run record and the model card keep about it."""
        return {
            "hub_id": self.repo_id,
            "revision": self.commit,
            "requested_revision": self.revision,
            "config": self.config,
            "split": self.split,
        }


def is_hub_dataset_id(source: Any) -> bool:
    """`org/name` or `org/name@rev` that is not a file here and has no data-file suffix."""
    if not isinstance(source, str) or Path(source).expanduser().exists():
        return False
    name = source.rpartition("@")[0] if "@" in source else source
    if name.lower().endswith(DATA_SUFFIXES) or name.startswith((".", "/", "~")):
        return False
    return re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None


def hub_dataset(source: str, config: str | None = None, split: str | None = None) -> HubDataset:
    """Parse `org/name[@revision]` into a HubDataset (not resolved yet)."""
    name, sep, revision = source.rpartition("@")
    if not sep:
        name, revision = source, None
    return HubDataset(repo_id=name, config=config, split=split or "train", revision=revision or None)


def resolve_commit(dataset: HubDataset, token: str | None = None) -> HubDataset:
    """The same data set pinned to the commit its revision names now (offline: the cached one, if any)."""
    from dataclasses import replace

    from huggingface_hub import HfApi, constants

    if dataset.commit:
        return dataset
    if token is None:
        from qlora_lite.hub.token import resolve_token

        token = resolve_token()
    if constants.is_offline_mode():
        return dataset  # datasets reads its own cache offline; the commit stays unknown
    try:
        info = HfApi().dataset_info(dataset.repo_id, revision=dataset.revision, token=token)
    except Exception as exc:
        raise read_error(exc, "data set", dataset.repo_id, dataset.revision, token) from None
    return replace(dataset, commit=info.sha)


def load_hub_records(dataset: HubDataset, token: str | None = None) -> tuple[list[dict], HubDataset]:
    """Every row of the split as a dict, and the data set pinned to the commit they came from."""
    import datasets

    dataset = resolve_commit(dataset, token)
    if token is None:
        from qlora_lite.hub.token import resolve_token

        token = resolve_token()
    where = f"data set {dataset.repo_id}" + (f" (config {dataset.config!r})" if dataset.config else "")
    try:
        rows = datasets.load_dataset(
            dataset.repo_id,
            name=dataset.config,
            split=dataset.split,
            revision=dataset.commit or dataset.revision,
            token=token,
        )
    except ValueError as exc:
        text = first_line(exc)
        if "split" in text.lower():
            raise UserError(f"{where} has no split {dataset.split!r} ({text}); pass --data-split") from None
        if "config" in text.lower():
            raise UserError(f"{where}: {text}; pass --data-config with one of them") from None
        raise UserError(f"{where}: {text}") from None
    except ConnectionError as exc:
        raise UserError(
            f"{where}: cannot reach the Hub ({first_line(exc)}); check the network, or unset HF_HUB_OFFLINE"
        ) from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        if "gated" in str(exc):
            from huggingface_hub import constants

            who = "no token is set" if not token else "this token's account has not been granted access"
            raise UserError(
                f"data set {dataset.repo_id} is gated and {who}: accept its conditions at "
                f"{constants.ENDPOINT}/datasets/{dataset.repo_id}, then set HF_TOKEN to a token of that account"
            ) from None
        raise UserError(f"{where}: {first_line(exc)}") from None
    except Exception as exc:  # huggingface_hub errors raised through datasets
        raise read_error(exc, "data set", dataset.repo_id, dataset.revision, token) from None
    log.info(
        "data set %s: commit %s, split %s, %d rows", dataset.repo_id, dataset.commit, dataset.split, len(rows)
    )
    return rows.to_list(), dataset


def pin_data_source(data: Any, config: str | None = None, split: str | None = None) -> Any:
    """A Hub data set id (or HubDataset) pinned to its commit now; any other data source as it is."""
    if isinstance(data, str) and is_hub_dataset_id(data):
        data = hub_dataset(data, config, split)
    elif (config or split) and not isinstance(data, HubDataset):
        raise UserError(
            f"--data-config / --data-split apply to a Hub data set id (org/name), not to {str(data)[:80]!r}"
        )
    return resolve_commit(data) if isinstance(data, HubDataset) else data
