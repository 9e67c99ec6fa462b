"""train() with the Hub: checkpoints to `hf://`, resume on a fresh machine from them, push when done.

Only the network boundary (qlora_lite.hub.client.make_client) is replaced, by the recording fake of fake_hub.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from fake_hub import FakeHub, FakeHubClient
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import qlora_lite
from qlora_lite.hub import client as hub_client

TOKEN = "hf_TrainTestToken0123456789abcdefQRS"
ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}."} for i in range(20)]
SETTINGS = dict(max_steps=4, effective_batch_size=4, micro_batch_size=2, lora_r=4, seed=5, progress=False)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeHub:
    server = FakeHub(tmp_path / "hub", {TOKEN: {"name": "alice", "orgs": [], "role": "write"}})
    monkeypatch.setattr(hub_client, "make_client", lambda token: FakeHubClient(server, token))
    monkeypatch.setattr(hub_client, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return server


def test_checkpoints_on_the_hub_resume_on_a_fresh_machine_and_the_adapter_is_pushed(
    fake, tiny_model, tmp_path
):
    settings = {**SETTINGS, "save_every_steps": 2, "checkpoint_dir": "hf://alice/run-checkpoints"}
    first = qlora_lite.train(
        tiny_model, ROWS, tmp_path / "machine-a" / "run", push_to_hub="alice/my-adapter", **settings
    )

    checkpoint_files = fake.files("alice/run-checkpoints", branch="checkpoints")
    assert {path.split("/")[1] for path in checkpoint_files} == {"checkpoint-000002", "checkpoint-000004"}
    assert fake.private("alice/run-checkpoints")

    pushed = fake.files("alice/my-adapter")
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "run_record.json",
        "loss.png",
    } <= set(pushed)
    assert not any(path.startswith("checkpoints/") for path in pushed)
    card = ModelCard(pushed["README.md"].decode())
    assert card.data.library_name == "peft"
    assert fake.private("alice/my-adapter")

    # A fresh machine: nothing local, the same settings -> it resumes from the Hub's newest checkpoint.
    second = qlora_lite.train(tiny_model, ROWS, tmp_path / "machine-b" / "run", **settings)
    assert second.resumed_from_step == 4 and second.metrics["steps"] == 4
    a = load_file(first.output_dir / "adapter_model.safetensors")
    b = load_file(second.output_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for path in (tmp_path / "machine-a").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in json.dumps(json.loads((first.output_dir / "run_config.json").read_text()))
