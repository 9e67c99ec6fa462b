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
def server(lora):
    from qlora_lite.inference.adapters import AdapterSet

    base, paths = lora
    with running(AdapterSet(base, paths, quantization=QUANTIZATION)) as handle:
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
