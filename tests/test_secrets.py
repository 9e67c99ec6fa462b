"""Secrets and the Hub as a durable place: no token in logged tracebacks, CLI errors or a notebook cell's
value; no local path in a pushed run record; a public checkpoint repo needs a flag; a Hub listing that fails
at the start of a run is an error, not a silent fresh start."""

from __future__ import annotations

import json
import logging

import pytest
from fake_hub import FakeHub, FakeHubClient, http_error

import qlora_lite
from qlora_lite.errors import UserError
from qlora_lite.hub import client as hub_client

TOKEN = "hf_SafetyTestToken0123456789abcdefXYZ"
ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(16)]
SETTINGS = dict(max_steps=2, effective_batch_size=4, micro_batch_size=2, lora_r=4, seed=5, progress=False)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeHub:
    server = FakeHub(tmp_path / "hub", {TOKEN: {"name": "alice", "orgs": [], "role": "write"}})
    monkeypatch.setattr(hub_client, "make_client", lambda token: FakeHubClient(server, token))
    monkeypatch.setattr(hub_client, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return server


def test_a_logged_traceback_never_shows_the_token(caplog):
    from qlora_lite.hub.token import protect_token

    protect_token(TOKEN)
    log = logging.getLogger("qlora_lite.test")
    try:
        raise RuntimeError(f"401 for token {TOKEN}")
    except RuntimeError:
        with caplog.at_level(logging.ERROR):
            log.exception("upload failed")
    assert "RuntimeError" in caplog.text and "hf_***" in caplog.text
    assert TOKEN not in caplog.text


def test_the_cli_error_line_never_shows_the_token(tiny_model, tmp_path, monkeypatch, capsys):
    from qlora_lite.cli.main import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    missing = tmp_path / f"{TOKEN}.jsonl"  # pasted into the wrong field
    assert (
        main(["train", "--model", tiny_model, "--data", str(missing), "--output", str(tmp_path / "r")]) == 2
    )
    err = capsys.readouterr().err
    assert "not found" in err and TOKEN not in err


def test_the_notebook_token_helper_does_not_show_the_token_as_a_cell_value(monkeypatch):
    from qlora_lite import notebook

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    token = notebook.hub_token()
    assert token == TOKEN and str(token) == TOKEN  # usable as the token
    assert TOKEN not in repr(token) and TOKEN not in repr([token])

    class Printer:
        text_out = ""

        def text(self, value):
            self.text_out += value

    printer = Printer()
    token._repr_pretty_(printer, False)  # what IPython shows for a cell ending in it
    assert TOKEN not in printer.text_out


def test_the_pushed_run_record_holds_no_local_path(fake, tiny_model, tmp_path):
    result = qlora_lite.train(
        tiny_model, ROWS, tmp_path / "machine" / "run", push_to_hub="alice/adapter", **SETTINGS
    )
    local = json.loads(result.run_record.read_text())
    assert str(tmp_path) in json.dumps(local)  # the local record keeps where things are
    pushed = fake.files("alice/adapter")["run_record.json"].decode()
    assert str(tmp_path) not in pushed and "/tmp" not in pushed
    assert json.loads(pushed)["identity"] == local["identity"]


def test_checkpoints_to_a_public_repo_need_a_flag(fake, tiny_model, tmp_path):
    fake.add_repo("alice/public-ckpt", private=False)
    settings = {**SETTINGS, "checkpoint_dir": "hf://alice/public-ckpt", "save_every_steps": 1}
    with pytest.raises(UserError, match=r"PUBLIC.*--public-checkpoints"):
        qlora_lite.train(tiny_model, ROWS, tmp_path / "run", **settings)
    assert "checkpoints" not in fake._meta("alice/public-ckpt")["branches"]  # nothing pushed
    result = qlora_lite.train(tiny_model, ROWS, tmp_path / "run", public_checkpoints=True, **settings)
    assert result.metrics["steps"] == 2
    assert any(p.startswith("checkpoints/") for p in fake.files("alice/public-ckpt", branch="checkpoints"))


@pytest.mark.parametrize("failure", ["5xx", "expired-token"])
def test_a_hub_listing_that_fails_at_start_is_an_error_not_a_fresh_start(
    fake, tiny_model, tmp_path, monkeypatch, failure
):
    settings = {**SETTINGS, "checkpoint_dir": "hf://alice/run-ckpt", "save_every_steps": 1}
    qlora_lite.train(tiny_model, ROWS, tmp_path / "machine-a" / "run", **settings)
    fresh = tmp_path / "machine-b" / "run"
    if failure == "5xx":
        fake.fail_next(
            "list_files", http_error(503, "https://hub.example/api/models/alice/run-ckpt/tree"), times=5
        )
        expected = "503"
    else:
        monkeypatch.setenv("HF_TOKEN", "hf_ExpiredToken000000000000000000000")
        expected = "401"
    with pytest.raises(UserError, match=rf"cannot list.*{expected}.*resume='local'"):
        qlora_lite.train(tiny_model, ROWS, fresh, **settings)
    assert not (fresh / "checkpoints").exists() or not list((fresh / "checkpoints").iterdir())
    if failure == "5xx":  # the Hub is back: the run continues from there, as it should have
        assert qlora_lite.train(tiny_model, ROWS, fresh, **settings).resumed_from_step == 2


def test_overwrite_moves_the_hub_checkpoints_aside_instead_of_deleting_them(
    fake, tiny_model, tmp_path, caplog
):
    settings = {**SETTINGS, "checkpoint_dir": "hf://alice/run-ckpt", "save_every_steps": 1}
    with caplog.at_level(logging.WARNING, logger="qlora_lite"):
        qlora_lite.train(tiny_model, ROWS, tmp_path / "a" / "run", **settings)
    # every copy verified at once (a manifest's missing digest once read as a mismatch and each copy retried)
    assert not [r.getMessage() for r in caplog.records if "could not copy" in r.getMessage()]
    before = fake.files("alice/run-ckpt", branch="checkpoints")
    assert {p.split("/")[1] for p in before} == {"checkpoint-000001", "checkpoint-000002"}
    qlora_lite.train(tiny_model, ROWS, tmp_path / "b" / "run", overwrite=True, learning_rate=1e-3, **settings)
    after = fake.files("alice/run-ckpt", branch="checkpoints")
    archived = {p.split("/", 1)[1]: data for p, data in after.items() if p.startswith("archived-")}
    assert archived == {p.split("/", 1)[1]: data for p, data in before.items()}  # kept, byte for byte
    current = [p for p in after if p.startswith("checkpoints/")]
    assert {p.split("/")[1] for p in current} == {"checkpoint-000001", "checkpoint-000002"}
    assert (
        after["checkpoints/checkpoint-000002/manifest.json"]
        != before["checkpoints/checkpoint-000002/manifest.json"]
    )
