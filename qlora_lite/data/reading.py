"""Read training data from a file (JSONL, JSON, CSV/TSV, Parquet), a `datasets.Dataset` or a list of dicts.

Each reader names the file and line of a problem; the format of the records is detected in `data.formats`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError


def load_records(source: Any) -> list[dict]:
    """Read examples from a file path, a Hub data set (`org/name[@revision]` or a `HubDataset`), a
    `datasets.Dataset`, a pandas DataFrame or a list of dicts."""
    from qlora_lite.data.hub_dataset import HubDataset, hub_dataset, is_hub_dataset_id, load_hub_records

    if is_hub_dataset_id(source):
        source = hub_dataset(source)
    if isinstance(source, HubDataset):
        records, _ = load_hub_records(source)
        source = records
    elif isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source))
    if isinstance(source, (list, tuple)):
        records = list(source)
        name = "the data list"
    elif hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas.DataFrame
        records = source.to_dict(orient="records")
        name = "the DataFrame"
    elif type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise UserError(
            f"got a dataset with splits {list(source.keys())}: pass one split, e.g. dataset['train']"
        )
    elif isinstance(source, Mapping):
        raise UserError("data must be a list of records, not one dict: wrap it in a list or give a file path")
    elif hasattr(source, "column_names") and hasattr(source, "to_list"):  # datasets.Dataset
        records = source.to_list()
        name = "the Dataset"
    else:
        raise UserError(
            f"cannot read data from a {type(source).__name__}: give a path to a "
            f"{'/'.join(_READERS)} file, a Hub data set id (org/name), a datasets.Dataset or a list of dicts"
        )
    for i, row in enumerate(records, start=1):
        if not isinstance(row, Mapping):
            raise UserError(
                f"{name} record {i}: got {type(row).__name__}, expected a dict of column -> value"
            )
    if not records:
        raise UserError(f"{name} holds no examples: add at least one record")
    return [dict(r) for r in records]


def _load_file(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"data file {path} not found: check the path (supported: {', '.join(_READERS)})")
    if path.is_dir():
        raise UserError(f"data path {path} is a folder: give one data file ({', '.join(_READERS)})")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"data file {path}: unknown suffix {path.suffix!r}; supported: {', '.join(_READERS)}")
    records = reader(path)
    if not records:
        raise UserError(f"{path} holds no examples: add at least one record")
    return records


def _read_table(path: Path) -> list[dict]:
    """CSV/TSV: every cell is text; empty cells stay empty strings (not NaN)."""
    import pandas as pd

    try:
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        text = _read_text(path)
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as exc:
        raise UserError(f"{path}: cannot parse as {path.suffix[1:].upper()} ({exc}); fix the file") from exc
    return frame.to_dict(orient="records")


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read as Parquet ({exc}); fix or re-export the file") from exc


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); another encoding is a one-line error naming the place."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_json(path: Path) -> list[dict]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_json_lines(path, text)  # a .json file holding JSON lines
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(
            f"{path}: top level is a {type(data).__name__}; expected a list of objects or JSON lines"
        )
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(
                f"{path} item {i}: got a {_json_type(row)}, expected an object (dict of column -> value)"
            )
    return data


def _read_json_lines(path: Path, text: str | None = None) -> list[dict]:
    text = _read_text(path) if text is None else text
    records = []
    # By "\n" only: str.splitlines() also cuts at U+2028/U+2029 and others, which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {lineno}: {exc.msg} at column {exc.colno} (expected one JSON object per line)"
            ) from exc
        if not isinstance(row, dict):
            raise UserError(
                f"{path} line {lineno}: got a {_json_type(row)}, expected one JSON object per line"
            )
        records.append(row)
    return records


def _json_type(value: Any) -> str:
    names = {
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


_READERS = {
    ".jsonl": _read_json_lines,
    ".ndjson": _read_json_lines,
    ".json": _read_json,
    ".csv": _read_table,
    ".tsv": _read_table,
    ".parquet": _read_parquet,
}


# -------------------------------------------------------------------------------------------- detection
