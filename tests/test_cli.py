"""The CLI: a real subprocess smoke run, and one clear line with exit status 2 for each user mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qlora_lite.cli.main import main

ROWS = [{"instruction": f"Say {i}", "output": f"The number is {i}."} for i in range(16)]
FAST_FLAGS = [
    "--max-steps",
    "2",
    "--micro-batch-size",
    "2",
    "--effective-batch-size",
    "4",
    "--lora-r",
    "4",
    "--no-progress",
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_then_generate_in_a_real_subprocess(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "qlora_lite",
        "train",
        "--model",
        tiny_model,
        "--data",
        data,
        "--output",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(cmd + FAST_FLAGS, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout)
    assert metrics["steps"] == 2 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert "plan" in done.stderr  # the plan is explained before training
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_lite",
            "generate",
            str(tmp_path / "run"),
            "--prompt",
            "Say 3",
            "--max-new-tokens",
            "5",
        ],
        capture_output=True,  # bytes: text mode would turn a generated "\r" into "\n"
        env=env,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr.decode()[-2000:]
    # The CLI prints exactly what the Python API answers for the same prompt (greedy, so deterministic).
    from qlora_lite import generate

    expected = generate("Say 3", adapter=str(tmp_path / "run"), max_new_tokens=5)
    assert gen.stdout.decode() == expected + "\n"


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_clear_line(err: str, *needles: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_path(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code, err = run_cli(
        ["train", "--model", str(tmp_path / "nope"), "--data", data, "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert_one_clear_line(err, "nope", "not found")


def test_missing_data_file(tiny_model, tmp_path, capsys):
    code, err = run_cli(
        [
            "train",
            "--model",
            tiny_model,
            "--data",
            str(tmp_path / "x.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2
    assert_one_clear_line(err, "x.jsonl", "not found")


def test_unparsable_data_names_file_and_line(tiny_model, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    code, err = run_cli(
        ["train", "--model", tiny_model, "--data", str(path), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert_one_clear_line(err, "bad.jsonl", "line 3")


def test_undetectable_format_lists_the_columns(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1, "bar": "x"}] * 4)
    code, err = run_cli(
        ["train", "--model", tiny_model, "--data", data, "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert_one_clear_line(err, "foo", "bar", "instruction")


def test_empty_data(tiny_model, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, err = run_cli(
        ["train", "--model", tiny_model, "--data", str(path), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert_one_clear_line(err, "empty.jsonl")


def test_output_holding_a_run_is_refused_and_kept(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    assert (
        run_cli(["train", "--model", tiny_model, "--data", data, "--output", str(out), *FAST_FLAGS], capsys)[
            0
        ]
        == 0
    )
    before = (out / "adapter_model.safetensors").read_bytes()
    other_run = [*FAST_FLAGS, "--learning-rate", "1e-3"]
    code, err = run_cli(
        ["train", "--model", tiny_model, "--data", data, "--output", str(out), *other_run], capsys
    )
    assert code == 2
    assert_one_clear_line(err, str(out), "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_debug_shows_the_traceback(tmp_path):
    from qlora_lite.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "generate", str(tmp_path / "missing"), "--prompt", "hi"])


def test_generate_needs_a_prompt_and_an_existing_adapter(tmp_path, capsys):
    code, err = run_cli(["generate", str(tmp_path / "missing"), "--prompt", "hi"], capsys)
    assert code == 2
    assert_one_clear_line(err, "missing")
    code, err = run_cli(["generate", str(tmp_path), "--prompt", "hi", "--chat", "x.json"], capsys)
    assert code == 2
    assert_one_clear_line(err, "--prompt", "--chat")


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["accelerator"] in ("cpu", "cuda", "mps")
    assert profile["ram_total_bytes"] > 0 and profile["environment"] in ("colab", "kaggle", "local")


def test_plan_with_a_data_file_uses_its_token_lengths(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert main(["plan", "--model", tiny_model, "--gpu", "t4", "--data", data, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("peak_memory_bytes", "usable_memory_bytes", "breakdown", "micro_batch_size", "fits"):
        assert key in plan
    assert (
        plan["num_examples"] == len(ROWS) and plan["compute_dtype"] == "fp16" and plan["max_seq_length"] <= 64
    )


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--gpu", "t5"], ["t5", "t4", "a100-80gb"]),
        (["--gpu", "t4", "--max-memory", "twelve gigs"], ["twelve gigs"]),
    ],
)
def test_plan_mistakes_exit_2(tiny_model, capsys, argv, needles):
    code, err = run_cli(["plan", "--model", tiny_model, *argv], capsys)
    assert code == 2
    assert_one_clear_line(err, *needles)


def test_train_routes_labelled_texts_to_the_classifier_and_classify_predicts(tiny_model, tmp_path, capsys):
    rows = [{"text": f"the quick fox {i}", "label": "fox"} for i in range(8)]
    rows += [{"text": f"the lazy dog {i}", "label": "dog"} for i in range(8)]
    data = write_jsonl(tmp_path / "labels.jsonl", rows)
    out = tmp_path / "clf"
    assert main(["train", "--model", tiny_model, "--data", data, "--output", str(out), *FAST_FLAGS]) == 0
    capsys.readouterr()
    record = json.loads((out / "run_record.json").read_text())
    assert record["task"] == "classification" and record["labels"]["names"] == ["dog", "fox"]
    assert main(["classify", str(out), "the lazy dog 3"]) == 0
    printed = capsys.readouterr().out
    assert "the lazy dog 3" in printed and (
        "dog" in printed.replace("the lazy dog 3", "") or "fox" in printed
    )
