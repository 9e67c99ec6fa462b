"""Data sets by Hub id (`datasets.load_dataset` through the real huggingface_hub code against the local stand-in,
tests/hub_server.py), and classifiers on the Hub: card, labels.json, `classify` by Hub id."""

from __future__ import annotations

import json

import pytest

from qlora_lite.cli.main import main
from qlora_lite.data.hub_dataset import hub_dataset, is_hub_dataset_id, load_hub_records, pin_data_source
from qlora_lite.data.reading import load_records
from qlora_lite.errors import UserError

ROWS = [{"instruction": f"Say {i}", "output": f"The number is {i}."} for i in range(8)]
TEST_ROWS = [{"instruction": "Say 99", "output": "The number is 99."}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def publish_dataset(hub_server, repo_id: str = "org/numbers", **kwargs) -> str:
    files = {"data/train.jsonl": jsonl(ROWS), "data/test.jsonl": jsonl(TEST_ROWS)}
    return hub_server.add_repo(repo_id, files, repo_type="dataset", **kwargs)


def test_a_data_set_by_id_is_pinned_to_its_commit(hub_server):
    sha = publish_dataset(hub_server)
    records, pinned = load_hub_records(hub_dataset("org/numbers"))
    assert records == ROWS and pinned.commit == sha
    test, _ = load_hub_records(hub_dataset("org/numbers", split="test"))
    assert test == TEST_ROWS
    assert load_records("org/numbers") == ROWS  # the same path every data argument takes


def test_a_revision_and_a_config(hub_server):
    first = publish_dataset(hub_server)
    readme = (
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: small/*.jsonl\n"
        "- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n---\n"
    )
    hub_server.add_commit(
        "org/numbers", {"README.md": readme, "small/a.jsonl": jsonl(ROWS[:2])}, repo_type="dataset"
    )
    records, _ = load_hub_records(hub_dataset("org/numbers", config="small"))
    assert records == ROWS[:2]
    old, pinned = load_hub_records(hub_dataset(f"org/numbers@{first}", split="test"))
    assert old == TEST_ROWS and pinned.commit == first


def test_train_on_a_data_set_by_id_records_id_and_commit(hub_server, tiny_model, tmp_path):
    import qlora_lite

    sha = publish_dataset(hub_server)
    result = qlora_lite.train(
        tiny_model, "org/numbers", str(tmp_path / "run"), max_steps=1, micro_batch_size=2,
        effective_batch_size=2, lora_r=4, progress=False,
    )  # fmt: skip
    data = json.loads(result.run_record.read_text())["data"]
    assert (data["hub_id"], data["revision"], data["split"], data["format"]) == (
        "org/numbers",
        sha,
        "train",
        "instruction",
    )
    from qlora_lite.hub.card import render_model_card

    card = render_model_card(result.output_dir, "user/numbers-lora")
    assert "datasets:\n- org/numbers" in card


def test_plan_with_a_data_set_by_id(hub_server, tiny_model, capsys):
    publish_dataset(hub_server)
    assert main(["plan", "--model", tiny_model, "--data", "org/numbers", "--gpu", "t4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == len(ROWS)


@pytest.mark.parametrize(
    "source, kwargs, match",
    [
        ("org/missing", {}, "data set org/missing: no such data set on the Hub"),
        ("org/numbers", {"split": "validation"}, "has no split 'validation'"),
        ("org/numbers", {"config": "nope"}, "nope"),
        ("org/numbers@v9", {}, "has no revision 'v9'"),
    ],
)
def test_data_set_mistakes_are_one_line(hub_server, source, kwargs, match):
    publish_dataset(hub_server)
    with pytest.raises(UserError, match=match) as caught:
        load_hub_records(hub_dataset(source, **kwargs))
    assert "\n" not in str(caught.value)


def test_a_gated_data_set_without_access(hub_server):
    publish_dataset(hub_server, "org/gated-data", gated="auto")
    with pytest.raises(UserError, match="data set org/gated-data is gated and no token is set"):
        load_records("org/gated-data")


def test_what_counts_as_a_data_set_id(tmp_path):
    assert is_hub_dataset_id("org/name") and is_hub_dataset_id("org/name@v1")
    assert not is_hub_dataset_id("train.jsonl") and not is_hub_dataset_id("data/train.jsonl")
    assert not is_hub_dataset_id("./org/name") and not is_hub_dataset_id(ROWS)
    (tmp_path / "org").mkdir()
    assert not is_hub_dataset_id(str(tmp_path / "org"))
    with pytest.raises(UserError, match="apply to a Hub data set id"):
        pin_data_source("train.jsonl", split="test")


# ------------------------------------------------------------------------------ classifiers on the Hub

LABELLED = [{"text": f"I {w} it", "label": label} for label, words in
            {"pos": ["love", "enjoy", "adore"], "neg": ["hate", "dislike", "loathe"]}.items()
            for w in words for _ in range(2)]  # fmt: skip


def test_a_classifier_pushed_to_the_hub_classifies_by_id(hub_server, tiny_model, tmp_path, monkeypatch):
    import qlora_lite

    monkeypatch.setenv("HF_TOKEN", "tok-user")
    sha = hub_server.add_folder("org/tiny", tiny_model)
    hub_server.add_commit("org/tiny", {"README.md": "---\nlicense: apache-2.0\n---\n"})
    data_sha = hub_server.add_repo("org/feelings", {"train.jsonl": jsonl(LABELLED)}, repo_type="dataset")
    result = qlora_lite.train_classifier(
        "org/tiny", "org/feelings", str(tmp_path / "clf"), max_steps=2, micro_batch_size=4,
        effective_batch_size=4, lora_r=4, progress=False, eval_fraction=0.0,
    )  # fmt: skip
    record = json.loads(result.run_record.read_text())
    assert record["base_model"]["hub_id"] == "org/tiny" and record["base_model"]["revision"] != sha
    assert record["data"]["hub_id"] == "org/feelings" and record["data"]["revision"] == data_sha
    local = qlora_lite.classify(str(result.output_dir), ["I love it", "I hate it"])

    qlora_lite.push(result.output_dir, "user/feelings")
    files = hub_server.files("user/feelings")
    assert "labels.json" in files and "adapter_model.safetensors" in files
    card = files["README.md"].decode()
    for line in (
        "pipeline_tag: text-classification",
        "license: apache-2.0",
        "- org/feelings",
        "base_model: org/tiny",
    ):
        assert line in card, line
    assert (
        "AutoModelForSequenceClassification" in card
        and 'hf_hub_download("user/feelings", "labels.json")' in card
    )

    by_id = qlora_lite.classify("user/feelings", ["I love it", "I hate it"])
    assert [r["label"] for r in by_id] == [r["label"] for r in local]


def test_the_cli_flags_for_hub_sources_and_the_chat_template(hub_server, tiny_model, tmp_path, capsys):
    first = hub_server.add_folder("org/tiny", tiny_model)
    hub_server.add_commit("org/tiny", {"README.md": "# later\n"})
    sha = publish_dataset(hub_server)
    out = tmp_path / "run"
    argv = [
        "train", "--model", "org/tiny", "--model-revision", first, "--data", "org/numbers", "--data-split",
        "test", "--chat-template", "llama3", "--output", str(out), "--max-steps", "1", "--micro-batch-size",
        "1", "--effective-batch-size", "1", "--lora-r", "4", "--no-progress", "--eval-fraction", "0",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "run_record.json").read_text())
    assert record["base_model"]["revision"] == first
    assert (record["data"]["hub_id"], record["data"]["revision"], record["data"]["split"]) == (
        "org/numbers",
        sha,
        "test",
    )
    assert record["data"]["records"] == len(TEST_ROWS)
    assert record["chat_template"] == {"template": "llama3", "end_of_turn": "<|eot_id|>"}
    assert "<|eot_id|>" in (out / "chat_template.jinja").read_text()
    assert record["identity"]["settings"]["chat_template"] == "llama3"
    capsys.readouterr()
    argv = [
        "plan",
        "--model",
        "org/tiny",
        "--data",
        "org/numbers",
        "--data-split",
        "test",
        "--gpu",
        "t4",
        "--json",
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == len(TEST_ROWS)
