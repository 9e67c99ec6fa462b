"""Inputs that used to crash: each is one line naming the place, exit 2 from the CLI, and nothing saved lost.
And one valid input that used to be refused (U+2028 inside a JSON string)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import qlora_lite
from qlora_lite.cli.main import main
from qlora_lite.data.reading import load_records
from qlora_lite.errors import UserError

ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(12)]
SETTINGS = dict(max_steps=2, effective_batch_size=4, micro_batch_size=2, lora_r=4, progress=False)


def cli_error(capsys, argv: list[str]) -> str:
    """Runs the CLI; asserts exit status 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def train_argv(model: str, data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--model",
        model,
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--no-progress",
    ]


def test_a_data_file_that_is_not_utf8_is_one_line_naming_the_file(tiny_model, tmp_path, capsys):
    noise = tmp_path / "noise.jsonl"
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
    latin1 = tmp_path / "orders.csv"
    latin1.write_bytes("instruction,output\nCafé crème,Réponse\n".encode("latin-1"))
    for path in (noise, latin1):
        with pytest.raises(UserError, match=rf"{path.name} line \d+: not UTF-8"):
            load_records(path)
        line = cli_error(capsys, train_argv(tiny_model, path, tmp_path / "run"))
        assert str(path) in line and "UTF-8" in line


def test_a_jsonl_line_with_a_line_separator_inside_a_string_loads_and_trains(tiny_model, tmp_path):
    rows = [{"instruction": f"Line\u2028break {i}\u2029 here", "output": f"ok {i}"} for i in range(12)]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert load_records(path) == rows
    result = qlora_lite.train(tiny_model, str(path), tmp_path / "run", **SETTINGS)
    assert result.metrics["steps"] == 2


def test_a_model_folder_without_weights_says_so(tiny_model, tmp_path, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for item in Path(tiny_model).iterdir():
        if not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, folder / item.name)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    line = cli_error(capsys, train_argv(str(folder), data, tmp_path / "run"))
    assert "no weights" in line and str(folder) in line


def test_a_null_text_part_is_one_line_naming_the_record(tiny_model, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "yo"},
            ]
        }
        for _ in range(6)
    ]
    rows[3]["messages"][0]["content"] = [{"type": "text", "text": None}]
    with pytest.raises(UserError, match=r"record 4: messages\[1\].*no text"):
        qlora_lite.train(tiny_model, rows, tmp_path / "run", **SETTINGS)


def test_corrupt_run_files_and_loop_state_are_one_line_and_nothing_is_lost(tiny_model, tmp_path, capsys):
    from qlora_lite.checkpoint.store import CheckpointStore

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "run"
    qlora_lite.train(tiny_model, str(data), out, save_every_steps=1, **SETTINGS)
    record = out / "run_record.json"
    good_record = record.read_bytes()
    record.write_bytes(good_record[:50])  # cut short
    with pytest.raises(UserError, match="run_record.json is unreadable"):
        qlora_lite.train(tiny_model, str(data), out, save_every_steps=1, **SETTINGS)
    assert record.read_bytes() == good_record[:50]  # left for the user to look at
    config = out / "run_config.json"
    config.write_text("{not json")
    line = cli_error(capsys, ["resume", str(out)])
    assert "run_config.json is unreadable" in line

    # A checkpoint whose loop state does not parse (its manifest agrees: written so, not damaged later).
    record.unlink()
    store = CheckpointStore(out / "checkpoints")
    latest = store.latest()
    files = {name: (latest.path / name).read_bytes() for name in latest.files}
    files["loop.json"] = b'{"step": "two", "unknown": 1}'
    store.save(latest.step, files, latest.metadata)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(UserError, match="could not be restored.*kept"):
        qlora_lite.train(tiny_model, str(data), out, save_every_steps=1, **SETTINGS)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_cli_errors_name_the_flag_typed(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["train", "--model", "m", "--data", str(data), "--output", str(tmp_path / "r"), "--max-steps", "0"]
    assert "--max-steps must be >= 1" in cli_error(capsys, argv)
