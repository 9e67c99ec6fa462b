"""The server under load and at its limits: concurrent mixed-adapter clients, a full queue, a client that
leaves mid-stream, timeouts, the API key. Each test starts its own real server on a loopback port."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
from serve_util import ADAPTERS, assert_openai_error, client, get, make_adapter, post, running

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

WORDS = ("fox", "dog", "cat", "Paris", "JSON", "model", "answer", "numbers", "joke")


@pytest.fixture(scope="module")
def adapter_set(tiny_model, tmp_path_factory):
    from qlora_lite.inference.adapters import AdapterSet

    root = tmp_path_factory.mktemp("limits-adapters")
    paths = {name: make_adapter(tiny_model, root / name, seed=10 + i) for i, name in enumerate(ADAPTERS)}
    return AdapterSet(tiny_model, paths, quantization="none")  # 16/32-bit: the fastest on CPU


def ask(handle, model: str, i: int, **kwargs):
    messages = [{"role": "user", "content": f"Question {i}: tell me about the {WORDS[i % len(WORDS)]}."}]
    kwargs.setdefault("max_tokens", 8)
    return client(handle).chat.completions.create(model=model, messages=messages, temperature=0, **kwargs)


def test_concurrent_clients_with_mixed_adapters_get_their_sequential_answers(adapter_set):
    models = [adapter_set.base_id, *ADAPTERS]
    requests = [(models[i % 3], i) for i in range(18)]
    with running(adapter_set, limits=_limits(max_batch=8)) as handle:
        sequential = {(m, i): ask(handle, m, i).choices[0].message.content for m, i in requests}
        assert len(set(sequential.values())) > len(requests) // 2  # the answers really differ
        start = threading.Barrier(len(requests))

        def one(request):
            start.wait()  # all 18 clients send at once
            reply = ask(handle, *request)
            return reply.model, reply.choices[0].message.content

        with ThreadPoolExecutor(len(requests)) as pool:
            concurrent = list(pool.map(one, requests))
        stats = get(handle, "/health")[1]
    wrong = [(r, got) for r, got in zip(requests, concurrent, strict=True) if got != (r[0], sequential[r])]
    assert wrong == []  # 0 cross-adapter answers, 0 errors (an error would have raised above)
    # Requests were really answered together, rows of different adapters in one generate call.
    assert stats["batched_rows"] > stats["batches"] and stats["mixed_batches"] >= 1
    assert stats["failed"] == 0


def _limits(**kwargs):
    from qlora_lite.inference.server import Limits

    return Limits(**kwargs)


def _open_stream(handle, max_tokens: int):
    """A raw streaming request, read up to its first chunk: the engine is now busy with it."""
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0,
            "stream": True}  # fmt: skip
    request = urllib.request.Request(
        handle.url + "/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    response = urllib.request.urlopen(request, timeout=120)
    while not response.readline().startswith(b"data:"):
        pass
    return response


def _close(response) -> None:
    # Close the socket itself (not only the reader) so the server sees the disconnect now.
    response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    response.close()


def test_a_full_queue_answers_429_and_the_server_stays_up(adapter_set):
    with running(adapter_set, limits=_limits(max_batch=1, max_queue=2, max_tokens=500)) as handle:
        stream = _open_stream(handle, max_tokens=500)  # holds the engine while the others arrive
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, handle, "/v1/chat/completions", {
                "model": ADAPTERS[i % 2], "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": f"hello {i}"}]}) for i in range(8)]  # fmt: skip
            # The 6 beyond the queue's 2 are answered at once, while the stream still holds the engine.
            early = list(itertools.islice(as_completed(futures), 6))
            assert sorted(f.result()[0] for f in early) == [429] * 6
            _close(stream)  # the client leaves mid-stream: its generation stops, the queue drains
            results = [f.result() for f in futures]
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 200] + [429] * 6
        for status, body in results:
            if status == 429:
                error = assert_openai_error(status, body, 429)
                assert error["code"] == "queue_full" and "--max-queue" in error["message"]
        health = get(handle, "/health")[1]
        assert health["status"] == "ok" and health["refused"] == 6 and health["streams_stopped"] == 1
        assert ask(handle, "beta", 1).choices[0].message.content is not None  # still answering


def test_a_request_past_the_timeout_is_504_and_leaves_the_queue(adapter_set):
    with running(adapter_set, limits=_limits(max_batch=1, timeout=0.01)) as handle:
        with pytest.raises(openai.APIStatusError) as caught:
            ask(handle, "alpha", 3, max_tokens=40)
        assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"
        assert get(handle, "/health")[0] == 200


def test_the_api_key_is_required_and_compared_whole(adapter_set, monkeypatch, caplog):
    key = "sk-test-" + "7" * 24
    monkeypatch.setenv("QLORA_LITE_API_KEY", key)
    caplog.set_level(logging.DEBUG)
    with running(adapter_set) as handle:
        for wrong in ("", "Bearer nope", f"Bearer {key[:-1]}", f"Basic {key}", f"Bearer {key}x"):
            headers = {"Authorization": wrong} if wrong else {}
            body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
            error = assert_openai_error(*post(handle, "/v1/chat/completions", body, headers), 401)
            assert error["code"] == "invalid_api_key" and key not in json.dumps(error)
        assert_openai_error(*get(handle, "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            client(handle, api_key="wrong").models.list()
        assert {m.id for m in client(handle, api_key=key).models.list()} >= set(ADAPTERS)
        assert ask_with_key(handle, key).choices[0].message.content is not None
        assert get(handle, "/health")[0] == 200  # open to health checks
    assert key not in caplog.text


def ask_with_key(handle, key):
    return client(handle, api_key=key).chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )


def test_without_a_key_the_server_binds_loopback_and_warns_for_another_host(caplog):
    from qlora_lite.inference.server.launch import resolve_host

    assert resolve_host(None, None) == "127.0.0.1"
    with caplog.at_level(logging.WARNING):
        assert resolve_host("127.0.0.1", None) == "127.0.0.1" and not caplog.records
        assert resolve_host("0.0.0.0", "a-key") == "0.0.0.0" and not caplog.records
        assert resolve_host("0.0.0.0", None) == "0.0.0.0"
    assert "without an API key" in caplog.text and "QLORA_LITE_API_KEY" in caplog.text


def test_closing_a_stream_stops_its_generation_at_the_next_token(adapter_set):
    prompt = "The quick brown fox"
    full = adapter_set.generate([prompt], "alpha", max_new_tokens=60)[0]
    assert full.finish_reason == "length"  # left alone, this stream would run 60 steps
    steps = []
    hook = adapter_set.model.get_base_model().register_forward_hook(lambda *args: steps.append(1))
    try:
        pieces = adapter_set.stream(prompt, "alpha", max_new_tokens=60)
        next(pieces)
        pieces.close()  # what the server does when the streaming client goes away
        for thread in threading.enumerate():
            if thread.name == "qlora-lite-stream":
                thread.join()
    finally:
        hook.remove()
    assert len(steps) < 20  # it stopped within a few steps, not after 60
    # The model is free and unharmed: the same request answers as before.
    assert adapter_set.generate([prompt], "alpha", max_new_tokens=60)[0] == full


def test_a_finished_stream_returns_its_completion(adapter_set):
    pieces = adapter_set.stream("The quick brown fox", "beta", max_new_tokens=10)
    text = []
    while True:
        try:
            text.append(next(pieces))
        except StopIteration as end:
            completion = end.value
            break
    assert completion == adapter_set.generate(["The quick brown fox"], "beta", max_new_tokens=10)[0]
    assert "".join(text) == completion.text


def test_an_engine_that_is_not_running_answers_503(adapter_set):
    import asyncio

    from qlora_lite.inference.server.engine import Engine, Job, Sampling
    from qlora_lite.inference.server.errors import APIError

    async def submit():
        Engine(adapter_set).submit(Job("generate", "alpha", "hi", Sampling(4)))

    with pytest.raises(APIError) as caught:
        asyncio.run(submit())
    assert caught.value.status == 503 and caught.value.body()["error"]["type"] == "server_overloaded"
