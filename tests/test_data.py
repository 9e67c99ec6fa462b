"""Loading, format detection, normalisation, fingerprint and split (qlora_lite.data)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from qlora_lite.data.formats import (
    FormatSpec,
    detect_format,
    fingerprint,
    load_dataset_for_training,
    load_records,
    split_train_eval,
    to_conversations,
    to_labeled_texts,
)
from qlora_lite.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


# ------------------------------------------------------------------------------------------ loading


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_records(path) == ROWS
    assert load_records(str(path)) == ROWS


def test_json_list_and_json_lines(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS))
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_records(listed) == ROWS
    assert load_records(lines) == ROWS


def test_csv_keeps_empty_cells_as_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nAdd the numbers.,2 and 3,5\nSay hi.,,"Hi!"\n')
    assert load_records(path) == ROWS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(chat), path)
    assert load_records(path) == chat


def test_datasets_dataset_dataframe_and_list():
    import datasets
    import pandas as pd

    assert load_records(datasets.Dataset.from_list(ROWS)) == ROWS
    assert load_records(pd.DataFrame(ROWS)) == ROWS
    assert load_records(ROWS) == ROWS
    with pytest.raises(UserError, match=r"pass one split"):
        load_records(datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "output": }\n')
    with pytest.raises(UserError, match=r"bad\.jsonl line 3: .*expected one JSON object per line"):
        load_records(path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(UserError, match=r"d\.jsonl line 2: got a array"):
        load_records(path)
    with pytest.raises(UserError, match=r"record 2"):
        load_records([ROWS[0], "text"])


def test_missing_file_unknown_suffix_and_empty(tmp_path):
    with pytest.raises(UserError, match=r"data file .*nope\.jsonl not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match=r"unknown suffix '\.xlsx'.*\.jsonl"):
        load_records(tmp_path / "d.xlsx")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"empty\.jsonl holds no examples"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"holds no examples"):
        load_records(tmp_path / "empty.csv")
    with pytest.raises(UserError, match=r"holds no examples"):
        load_records([])


# ---------------------------------------------------------------------------------------- detection

CASES = [
    (
        {"instruction": "a", "input": "b", "output": "c"},
        "instruction",
        {"instruction": "instruction", "input": "input", "output": "output"},
    ),
    (
        {"instruction": "a", "context": "b", "response": "c"},
        "instruction",
        {"instruction": "instruction", "input": "context", "output": "response"},
    ),
    (
        {"prompt": "a", "completion": "b"},
        "prompt_completion",
        {"prompt": "prompt", "completion": "completion"},
    ),
    ({"question": "a", "answer": "b"}, "question_answer", {"question": "question", "answer": "answer"}),
    ({"messages": [{"role": "user", "content": "a"}]}, "chat", {"messages": "messages"}),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt", {"conversations": "conversations"}),
    ({"text": "a"}, "text", {"text": "text"}),
    ({"text": "a", "label": 1}, "classification", {"text": "text", "label": "label"}),
    ({"Sentence": "a", "intent": "x"}, "classification", {"text": "Sentence", "label": "intent"}),
]


@pytest.mark.parametrize(("row", "name", "columns"), CASES)
def test_detect_each_format(row, name, columns):
    spec = detect_format([row])
    assert (spec.name, spec.columns) == (name, columns)
    assert spec.task == ("classification" if name == "classification" else "causal_lm")
    assert spec.reason


def test_user_mapped_columns_and_named_format():
    rows = [{"q": "What?", "a": "That.", "id": 1}]
    spec = detect_format(rows, columns={"instruction": "q", "output": "a"})
    assert spec.name == "instruction" and spec.columns == {"instruction": "q", "output": "a"}
    assert "mapped" in spec.reason
    spec = detect_format(rows, format="question_answer", columns={"question": "q", "answer": "a"})
    assert spec.name == "question_answer"
    assert to_conversations(rows, spec)[0] == [
        {"role": "user", "content": "What?"},
        {"role": "assistant", "content": "That."},
    ]


def test_named_format_can_override_detection():
    rows = [{"text": "hello", "label": "x"}]
    assert detect_format(rows).name == "classification"
    assert detect_format(rows, format="text").name == "text"


def test_named_format_with_missing_columns():
    with pytest.raises(UserError, match=r"format 'chat' needs columns messages .*data has text, label"):
        detect_format([{"text": "a", "label": 1}], format="chat")
    with pytest.raises(UserError, match=r"unknown data format 'alpaca'.*instruction"):
        detect_format([{"text": "a"}], format="alpaca")
    with pytest.raises(
        UserError, match=r"column 'q' \(mapped to 'instruction'\) is not in the data; columns seen: x"
    ):
        detect_format([{"x": "a"}], columns={"instruction": "q"})


def test_undetectable_format_lists_seen_and_expected_columns():
    with pytest.raises(UserError) as err:
        detect_format([{"foo": 1, "bar": 2}])
    message = str(err.value)
    assert "foo, bar" in message
    assert "instruction+output" in message and "messages" in message and "conversations" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------ normalisation


def test_instruction_to_conversation():
    spec = detect_format(ROWS)
    convs = to_conversations(ROWS, spec)
    assert convs[0] == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert convs[1][0] == {"role": "user", "content": "Say hi."}


def test_sharegpt_roles_are_mapped():
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        }
    ]
    assert to_conversations(rows, detect_format(rows))[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_text_and_classification():
    rows = [{"text": "Once upon a time."}]
    assert to_conversations(rows, detect_format(rows)) == [[{"role": "text", "content": "Once upon a time."}]]
    rows = [{"text": "great", "label": "pos"}, {"text": "bad", "label": "neg"}]
    spec = detect_format(rows)
    assert to_labeled_texts(rows, spec) == [("great", "pos"), ("bad", "neg")]
    with pytest.raises(UserError, match="classification"):
        to_conversations(rows, spec)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([ROWS[0], {"instruction": "x", "output": ""}], r"record 2: field 'output' is missing or empty"),
        ([ROWS[0], {"instruction": "x"}], r"record 2: field 'output' is missing or empty"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}],
            r"record 1: messages\[2\]: role 'robot'",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}]}],
            r"record 1: 'messages' has no assistant message",
        ),
        ([{"messages": []}], r"record 1: field 'messages' must be a non-empty list"),
    ],
)
def test_invalid_records_name_index_and_field(rows, pattern):
    spec = detect_format(rows[:1])
    with pytest.raises(UserError, match=pattern):
        to_conversations(rows, spec)


# ------------------------------------------------------------------------------- fingerprint, split


def test_fingerprint_stable_and_sensitive():
    spec = detect_format(ROWS)
    fp = fingerprint(ROWS, spec)
    assert len(fp) == 64 and fp == fingerprint([dict(r) for r in ROWS], spec)
    changed = [ROWS[0], {**ROWS[1], "output": "Hi."}]
    assert fingerprint(changed, spec) != fp
    assert fingerprint(list(reversed(ROWS)), spec) != fp
    other = FormatSpec(
        name="instruction", columns={"instruction": "input", "output": "output"}, reason="", task="causal_lm"
    )
    assert fingerprint(ROWS, other) != fp


def test_fingerprint_is_the_same_in_another_process():
    code = (
        "from qlora_lite.data.formats import detect_format, fingerprint; import json, sys; "
        "rows = json.loads(sys.argv[1]); print(fingerprint(rows, detect_format(rows)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ROWS)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == fingerprint(ROWS, detect_format(ROWS))


def test_split_deterministic_and_disjoint():
    items = list(range(50))
    train, held = split_train_eval(items, eval_fraction=0.1, seed=3)
    assert (train, held) == split_train_eval(items, eval_fraction=0.1, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert split_train_eval(items, eval_fraction=0.1, seed=4)[1] != held
    assert split_train_eval(items, eval_fraction=0) == (items, [])
    assert len(split_train_eval(list(range(5000)), eval_fraction=0.5)[1]) == 200
    assert len(split_train_eval(list(range(5)), eval_fraction=0.01)[1]) == 1


def test_split_too_few_items(caplog):
    with caplog.at_level(logging.INFO, logger="qlora_lite.data"):
        assert split_train_eval([1, 2, 3]) == ([1, 2, 3], [])
    assert "no eval split" in caplog.text
    with pytest.raises(UserError, match="eval_fraction"):
        split_train_eval([1, 2, 3, 4, 5], eval_fraction=1.5)


def test_load_dataset_for_training_logs_choice(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    with caplog.at_level(logging.INFO, logger="qlora_lite.data"):
        records, spec = load_dataset_for_training(path)
    assert records == ROWS and spec.name == "instruction"
    assert "format instruction" in caplog.text and "instruction/input/output found" in caplog.text
