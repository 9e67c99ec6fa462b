"""The OpenAI-compatible server, over real HTTP on loopback, through the real `openai` client.

One server (tiny 4-bit base + two random LoRA adapters) answers every test here; servers with other
settings (API key, small queue, short timeout) and the load test are in test_serve_limits.py.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from serve_util import ADAPTERS, assert_openai_error, client, get, make_adapter, post, running

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

QUANTIZATION = "nf4"  # what `qlora-lite generate` uses for an adapter folder without a run record
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the fox."},
]


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    return tiny_model, {
        name: make_adapter(tiny_model, root / name, seed=i + 1) for i, name in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="module")
def adapter_set(lora):
    from qlora_lite.inference.adapters import AdapterSet

    base, paths = lora
    return AdapterSet(base, paths, quantization=QUANTIZATION)


@pytest.fixture(scope="module")
def server(adapter_set):
    with running(adapter_set) as handle:
        yield handle


def chat(handle, model, messages=CHAT, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client(handle).chat.completions.create(model=model, messages=messages, temperature=0, **kwargs)


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, lora):
    base, paths = lora
    models = {m.id: m for m in client(server).models.list()}
    assert set(models) == {base, *ADAPTERS}
    assert models[base].model_extra["parent"] is None
    for name in ADAPTERS:
        assert models[name].model_extra["parent"] == base
        assert models[name].object == "model"
    assert client(server).models.retrieve("alpha").id == "alpha"


def test_greedy_chat_per_adapter_equals_qlora_lite_generate(server, lora, tmp_path, capsys):
    from qlora_lite.cli.main import main

    base, paths = lora
    chat_file = tmp_path / "chat.json"
    chat_file.write_text(json.dumps(CHAT))
    answers = {}
    for name in (base, *ADAPTERS):
        reply = chat(server, name)
        argv = ["generate", *([paths[name]] if name in paths else []), "--model", base]
        assert main([*argv, "--chat", str(chat_file), "--max-new-tokens", "12"]) == 0
        expected = capsys.readouterr().out.removesuffix("\n")
        assert reply.choices[0].message.content == expected, name
        assert reply.model == name and reply.choices[0].finish_reason in ("stop", "length")
        usage = reply.usage
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        answers[name] = expected
    # The adapters really change the answer: a request served by the wrong one would show.
    assert len(set(answers.values())) == 3, answers


@pytest.mark.parametrize("model", ["alpha", "beta"])
def test_streaming_yields_the_same_text_in_openai_chunks(server, model):
    whole = chat(server, model)
    chunks = list(chat(server, model, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(
        c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == model for c in chunks
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_raw_stream_ends_with_done(server):
    body = json.dumps(
        {"model": "beta", "prompt": "The quick", "max_tokens": 6, "temperature": 0, "stream": True}
    )
    request = urllib.request.Request(
        server.url + "/completions", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line.strip() for line in response.read().decode().splitlines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data:")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1  # usage in every answer, streamed ones too
    whole = client(server).completions.create(model="beta", prompt="The quick", max_tokens=6, temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text


def test_completions_take_the_prompt_as_raw_text(server, lora):
    from transformers import AutoTokenizer

    reply = client(server).completions.create(
        model="alpha", prompt="The quick brown", max_tokens=5, temperature=0
    )
    tokenizer = AutoTokenizer.from_pretrained(lora[0])
    assert reply.usage.prompt_tokens == len(tokenizer("The quick brown")["input_ids"])  # no chat template
    assert reply.object == "text_completion" and reply.model == "alpha"
    assert reply.usage.completion_tokens <= 5


def test_max_tokens_and_stop_are_honoured(server):
    long = chat(server, "alpha", max_tokens=20)
    text = long.choices[0].message.content
    assert long.usage.completion_tokens <= 20
    if len(text) > 4:
        stop = text[2:4]
        cut = chat(server, "alpha", max_tokens=20, stop=[stop])
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_repeatable(server):
    ask = dict(model="beta", messages=CHAT, max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = client(server).chat.completions.create(**ask).choices[0].message.content
    again = client(server).chat.completions.create(**ask).choices[0].message.content
    assert first == again


def test_unknown_model_is_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError) as caught:
        chat(server, "gamma")
    assert caught.value.status_code == 404
    error = assert_openai_error(
        *post(server, "/v1/chat/completions", {"model": "gamma", "messages": CHAT}), 404
    )
    assert "alpha" in error["message"] and error["param"] == "model" and error["code"] == "model_not_found"
    assert_openai_error(*get(server, "/v1/nothing-here"), 404)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "alpha", "messages": CHAT, "n": 2}, "n"),
        ({"model": "alpha", "messages": CHAT, "temperature": 3}, "temperature"),
        ({"model": "alpha", "messages": []}, "messages"),
        ({"model": "alpha"}, "messages"),
        ({"model": "alpha", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"model": "alpha", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "alpha", "messages": CHAT, "logprobs": True}, None),
        ({"model": "alpha", "messages": CHAT, "max_tokens": 100000}, "max_tokens"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(server, body, param):
    error = assert_openai_error(*post(server, "/v1/chat/completions", body), 400)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param and param.split(".")[0] in error["message"]


def test_a_body_that_is_not_json_is_400(server):
    error = assert_openai_error(*post(server, "/v1/chat/completions", b"{not json"), 400)
    assert "JSON" in error["message"]


def test_a_body_over_the_limit_is_413(server):
    huge = {"model": "alpha", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert_openai_error(*post(server, "/v1/chat/completions", huge), 413)


def test_a_prompt_longer_than_the_context_is_422(server):
    words = " ".join(["fox"] * 2000)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        chat(server, "alpha", messages=[{"role": "user", "content": words}])
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "context" in caught.value.body["message"]


def test_adapters_load_and_unload_at_run_time_in_vllms_shape(server, lora, tmp_path):
    base, _ = lora
    gamma = make_adapter(base, tmp_path / "gamma", seed=99)
    status, text = post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": gamma})
    assert status == 200 and "gamma" in text
    assert "gamma" in {m.id for m in client(server).models.list()}
    assert (
        chat(server, "gamma").choices[0].message.content != chat(server, "alpha").choices[0].message.content
    )
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": gamma})
    assert_openai_error(*again, 400)
    missing = post(
        server, "/v1/load_lora_adapter", {"lora_name": "delta", "lora_path": str(tmp_path / "nope")}
    )
    assert_openai_error(*missing, 400)
    status, text = post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        chat(server, "gamma")
    assert_openai_error(*post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}), 404)


def test_health_answers(server):
    status, body = get(server, "/health")
    assert status == 200 and body["status"] == "ok"


def test_classify_answers_for_a_classifier_adapter_loaded_at_run_time(server, lora, tmp_path):
    from qlora_lite.inference.classification import load_classifier
    from qlora_lite.training.api import train_classifier

    rows = [
        {"text": f"I {w} thing {i}", "label": lab}
        for i in range(6)
        for lab, w in (("pos", "love"), ("neg", "hate"))
    ]
    fast = dict(max_steps=2, effective_batch_size=4, micro_batch_size=2, progress=False, lora_r=4, seed=3)
    run = train_classifier(lora[0], rows, str(tmp_path / "cls"), eval_fraction=0.25, **fast).output_dir
    status, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "sentiment", "lora_path": str(run)})
    assert status == 200
    try:
        texts = ["I love thing 9", "I hate it", "thing"]
        status, body = post(server, "/v1/classify", {"model": "sentiment", "input": texts})
        assert status == 200, body
        expected = load_classifier(run).predict(texts)
        assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
        for got, want in zip(body["data"], expected, strict=True):
            # Same weights, same 4-bit kernels; the last digits move with the thread count of the moment.
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-3)
            assert got["num_classes"] == 2 and got["probs"] == list(got["probabilities"].values())
        assert (
            body["object"] == "list" and body["model"] == "sentiment" and body["usage"]["prompt_tokens"] > 0
        )
        card = client(server).models.retrieve("sentiment")
        assert card.model_extra["task"] == "classification" and card.model_extra["parent"] == lora[0]
        assert_openai_error(
            *post(server, "/v1/chat/completions", {"model": "sentiment", "messages": CHAT}), 400
        )
        assert_openai_error(*post(server, "/v1/classify", {"model": "alpha", "input": "hi"}), 400)
        assert_openai_error(*post(server, "/v1/classify", {"model": "sentiment", "input": []}), 400)
    finally:
        post(server, "/v1/unload_lora_adapter", {"lora_name": "sentiment"})


def test_print_vllm_writes_the_equivalent_command_and_the_compatibility(lora, tmp_path, capsys):
    from qlora_lite.cli.main import main

    base, paths = lora
    big = make_adapter(base, tmp_path / "big", seed=5, r=32)
    dora = make_adapter(base, tmp_path / "dora", seed=6, use_dora=True)
    argv = ["serve", "--print-vllm", "--model", "org/tiny-base", "--adapter", f"alpha={paths['alpha']}"]
    assert main([*argv, "--adapter", f"big={big}", "--adapter", f"dora={dora}"]) == 0
    out = capsys.readouterr().out
    command = out.splitlines()[0]
    assert command.startswith("vllm serve org/tiny-base --enable-lora --lora-modules ")
    assert f"alpha={paths['alpha']}" in command and f"big={big}" in command
    assert "--max-lora-rank 32" in command and "--max-loras 3" in command
    verdicts = {
        line.split(":")[0].strip("# ").strip(): line for line in out.splitlines() if line.startswith("#   ")
    }
    assert "accepts" in verdicts["alpha"] and "DoRA" in verdicts["dora"]
    # Without --model the base comes from the adapters themselves; it serves nothing and loads no weights.
    assert main(["serve", "--print-vllm", "--adapter", f"alpha={paths['alpha']}"]) == 0
    assert capsys.readouterr().out.startswith(f"vllm serve {base} ")


def test_cli_serve_starts_a_real_server(lora, tmp_path):
    import os
    import re
    import subprocess
    import sys

    base, paths = lora
    cmd = [
        sys.executable,
        "-m",
        "qlora_lite",
        "serve",
        "--model",
        base,
        "--adapter",
        f"alpha={paths['alpha']}",
    ]
    env = {**os.environ, "QLORA_LITE_API_KEY": "cli-key", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*cmd, "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stderr:  # the socket listens before this line is written: no waiting needed
            found = re.search(r"serving on (http://\S+/v1)", line)
            if found:
                break
        else:
            pytest.fail("the server never said where it listens")
        import openai as openai_client

        models = openai_client.OpenAI(base_url=found.group(1), api_key="cli-key", max_retries=0).models.list()
        assert {m.id for m in models} == {base, "alpha"}
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert main_exit_for_bad_adapter_flag() == 2


def main_exit_for_bad_adapter_flag() -> int:
    from qlora_lite.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--adapter", "no-equals-sign"])
    return caught.value.code


def test_model_auto_asks_the_router_and_says_which_adapter_answered(adapter_set, server, tmp_path):
    from qlora_lite.inference.router import Router

    path = Router.from_keywords({"alpha": ["fox"], "beta": ["dog"]}).save(tmp_path / "router.json")
    with running(adapter_set, router=str(path)) as handle:
        assert "auto" in {m.id for m in client(handle).models.list()}
        for text, expected in (("Tell me about the fox.", "alpha"), ("Tell me about the dog.", "beta")):
            messages = [{"role": "user", "content": text}]
            routed = chat(handle, "auto", messages=messages)
            assert routed.model == expected and routed.model_extra["route"]["adapter"] == expected
            assert (
                routed.choices[0].message.content
                == chat(server, expected, messages=messages).choices[0].message.content
            )
            chunks = list(chat(handle, "auto", messages=messages, stream=True))
            assert {c.model for c in chunks} == {expected}
        fallback = chat(handle, "auto", messages=[{"role": "user", "content": "Hello there"}])
        assert fallback.model == adapter_set.base_id and fallback.model_extra["route"]["adapter"] is None
        assert "threshold" in fallback.model_extra["route"]["reason"]
    with pytest.raises(openai.NotFoundError):  # no router, no "auto"
        chat(server, "auto")
    from qlora_lite.errors import UserError

    wrong = Router.from_keywords({"gamma": ["cat"]}).save(tmp_path / "wrong.json")
    with pytest.raises(UserError, match="gamma"):
        running(adapter_set, router=str(wrong)).__enter__()
