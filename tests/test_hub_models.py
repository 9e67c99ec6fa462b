"""Models by Hub id, through the real huggingface_hub code against a local HTTP stand-in of the Hub.

Every model here exists only on the stand-in (tests/hub_server.py); nothing is read from a local folder by
path. The planner fetches config.json alone (no weights), pinned to a commit; each way a user can fail to
reach a model is one line and exit status 2.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from qlora_lite.cli.main import main
from qlora_lite.errors import UserError
from qlora_lite.model.source import resolve_model_source, split_revision

PLAN_FLAGS = ["--gpu", "t4", "--json"]


def publish(hub_server, tiny_model: str, repo_id: str = "org/tiny", **kwargs) -> str:
    return hub_server.add_folder(repo_id, tiny_model, **kwargs)


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, *PLAN_FLAGS]) == 0
    return json.loads(capsys.readouterr().out)


def fails_with(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2, return its one error line."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_plan_by_hub_id_fetches_config_json_alone(hub_server, tiny_model, capsys):
    sha = publish(hub_server, tiny_model)
    from_hub = plan_json(capsys, "--model", "org/tiny")
    from_folder = plan_json(capsys, "--model", tiny_model)
    assert from_hub["peak_memory_bytes"] == from_folder["peak_memory_bytes"] > 0
    assert from_hub["breakdown"] == from_folder["breakdown"]
    fetched = [path for method, path in hub_server.requests if "/resolve/" in path]
    assert fetched and all(path.endswith("/config.json") for path in fetched), fetched
    assert resolve_model_source("org/tiny").revision == sha  # pinned to the commit


def test_plan_with_data_loads_the_tokenizer_from_the_hub(hub_server, tiny_model, tmp_path, capsys):
    publish(hub_server, tiny_model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "x " * n, "output": "y"}) + "\n" for n in (5, 40, 90)))
    plan = plan_json(capsys, "--model", "org/tiny", "--data", str(data))
    assert plan["num_examples"] == 3
    assert not any(path.endswith(".safetensors") for _, path in hub_server.requests)


def test_a_pinned_revision_plans_that_commit(hub_server, tiny_model, capsys):
    first = publish(hub_server, tiny_model)
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    bigger = {**config, "num_hidden_layers": 8}
    second = hub_server.add_commit("org/tiny", {"config.json": json.dumps(bigger)})
    hub_server.tag("org/tiny", "v1", first)

    latest = plan_json(capsys, "--model", "org/tiny")
    pinned = plan_json(capsys, "--model", f"org/tiny@{first}")
    by_tag = plan_json(capsys, "--model", "org/tiny@v1")
    assert latest["peak_memory_bytes"] > pinned["peak_memory_bytes"] == by_tag["peak_memory_bytes"]

    source = resolve_model_source("org/tiny@v1")
    assert (source.hub_id, source.revision, source.requested_revision) == ("org/tiny", first, "v1")
    assert resolve_model_source("org/tiny").revision == second


def test_the_python_api_plans_a_hub_id(hub_server, tiny_model):
    import qlora_lite

    publish(hub_server, tiny_model)
    plan = qlora_lite.plan("org/tiny", hardware="t4")
    assert plan.fits and plan.peak_memory_bytes > 0


def test_license_comes_from_the_model_card(hub_server, tiny_model):
    publish(hub_server, tiny_model)
    hub_server.add_commit("org/tiny", {"README.md": "---\nlicense: apache-2.0\n---\n# tiny\n"})
    assert resolve_model_source("org/tiny").license == "apache-2.0"


def test_split_revision():
    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")
    assert split_revision("org/name") == ("org/name", None)
    assert split_revision("./runs/a@b/model") == ("./runs/a@b/model", None)


# ---------------------------------------------------------------------------------------- errors


def test_no_such_repo(hub_server, capsys):
    line = fails_with(capsys, ["plan", "--model", "org/missing", *PLAN_FLAGS])
    assert "org/missing" in line and "no such model on the Hub" in line and "HF_TOKEN" in line


def test_a_private_repo_needs_a_token_of_its_namespace(hub_server, tiny_model, capsys, monkeypatch):
    publish(hub_server, tiny_model, "org/secret", private=True)
    line = fails_with(capsys, ["plan", "--model", "org/secret", *PLAN_FLAGS])
    assert "no token is set" in line
    monkeypatch.setenv("HF_TOKEN", "tok-user")  # "user" is a member of "org"
    assert plan_json(capsys, "--model", "org/secret")["peak_memory_bytes"] > 0


def test_a_gated_repo_without_access(hub_server, tiny_model, capsys, monkeypatch):
    publish(hub_server, tiny_model, "meta/gated", gated="manual")
    line = fails_with(capsys, ["plan", "--model", "meta/gated", *PLAN_FLAGS])
    assert "is gated and no token is set" in line and f"{hub_server.url}/meta/gated" in line
    monkeypatch.setenv("HF_TOKEN", "tok-user")
    line = fails_with(capsys, ["plan", "--model", "meta/gated", *PLAN_FLAGS])
    assert "has not been granted access" in line
    assert "tok-user" not in line
    hub_server.grant("meta/gated", "user")
    assert plan_json(capsys, "--model", "meta/gated")["peak_memory_bytes"] > 0


def test_a_repo_without_config_json(hub_server, capsys):
    hub_server.add_repo("org/gguf-only", {"model.Q4_0.gguf": b"GGUF", "README.md": "# gguf"})
    line = fails_with(capsys, ["plan", "--model", "org/gguf-only", *PLAN_FLAGS])
    assert "has no config.json" in line and "model.Q4_0.gguf" in line
    hub_server.add_repo("org/an-adapter", {"adapter_config.json": "{}", "adapter_model.safetensors": b"x"})
    line = fails_with(capsys, ["plan", "--model", "org/an-adapter", *PLAN_FLAGS])
    assert "is a LoRA adapter, not a base model" in line


def test_a_revision_that_does_not_exist(hub_server, tiny_model, capsys):
    publish(hub_server, tiny_model)
    line = fails_with(capsys, ["plan", "--model", "org/tiny@nope", *PLAN_FLAGS])
    assert "has no revision 'nope'" in line


def test_offline_mode_without_a_cached_copy(hub_server, tiny_model, capsys, monkeypatch):
    import huggingface_hub.constants

    publish(hub_server, tiny_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = fails_with(capsys, ["plan", "--model", "org/tiny", *PLAN_FLAGS])
    assert "offline mode (HF_HUB_OFFLINE=1)" in line and "not in the Hugging Face cache" in line


def test_offline_mode_uses_the_cached_commit(hub_server, tiny_model, monkeypatch):
    import huggingface_hub.constants

    sha = publish(hub_server, tiny_model)
    online = resolve_model_source("org/tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests = len(hub_server.requests)
    offline = resolve_model_source("org/tiny")
    assert offline.revision == online.revision == sha
    assert len(hub_server.requests) == requests  # not one request


def test_no_network(hub_server, tiny_model, capsys, monkeypatch):
    import huggingface_hub.constants

    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)
    line = fails_with(capsys, ["plan", "--model", "org/tiny", *PLAN_FLAGS])
    assert f"cannot reach the Hub at {closed}" in line and "network" in line


def test_a_hub_that_answers_503_is_unreachable_too(hub_server, tiny_model):
    publish(hub_server, tiny_model)
    hub_server.offline = True
    with pytest.raises(UserError, match="cannot reach the Hub"):
        resolve_model_source("org/tiny")


def test_not_a_folder_nor_an_id(capsys, tmp_path):
    line = fails_with(capsys, ["plan", "--model", str(tmp_path / "nowhere" / "x" / "y"), *PLAN_FLAGS])
    assert "not a local folder, nor a Hub id" in line


# ---------------------------------------------------------------------------------------- training

TRAIN_ROWS = [{"instruction": f"Say {i}", "output": f"The number is {i}."} for i in range(8)]
FAST = dict(max_steps=2, micro_batch_size=2, effective_batch_size=4, lora_r=4, progress=False)


def test_train_by_hub_id_pins_the_commit_then_generates(hub_server, tiny_model, tmp_path):
    import qlora_lite

    first = publish(hub_server, tiny_model)
    out = tmp_path / "run"
    result = qlora_lite.train("org/tiny", TRAIN_ROWS, str(out), **FAST)
    base = json.loads(result.run_record.read_text())["base_model"]
    assert (base["hub_id"], base["revision"], base["path"]) == ("org/tiny", first, "org/tiny")
    downloaded = [path for _, path in hub_server.requests if path.endswith("model.safetensors")]
    assert downloaded, "the weights came from the stand-in Hub"

    # main moves on; generation from the run folder loads the base at the recorded commit
    hub_server.add_commit("org/tiny", {"README.md": "# moved on\n"})
    hub_server.requests.clear()
    text = qlora_lite.generate("Say 3", adapter=str(out), max_new_tokens=4)
    assert isinstance(text, str)
    infos = [path for _, path in hub_server.requests if path.startswith("/api/models/org/tiny")]
    assert infos == [f"/api/models/org/tiny/revision/{first}"]  # asked for that commit, not for main


def test_train_at_a_pinned_revision(hub_server, tiny_model, tmp_path):
    import qlora_lite

    first = publish(hub_server, tiny_model)
    hub_server.add_commit("org/tiny", {"README.md": "---\nlicense: mit\n---\n"})
    result = qlora_lite.train(f"org/tiny@{first}", TRAIN_ROWS, str(tmp_path / "run"), **FAST)
    record = json.loads(result.run_record.read_text())
    assert record["base_model"]["revision"] == first
    assert record["base_model"]["requested_revision"] == first
    assert record["identity"]["base_model"] == {
        "hub_id": "org/tiny",
        "revision": first,
        "config_sha256": record["base_model"]["config_sha256"],
    }
