"""Shared pieces of the server tests: distinct random LoRA adapters on the tiny base, a live server, a client.

The adapters are randomly initialised (PEFT's `init_lora_weights=False`, a different seed each) so that
each one really changes the output: a request answered with the wrong adapter gives a different text.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch

ADAPTERS = ("alpha", "beta")


def make_adapter(base: str, folder: Path, seed: int, r: int = 4, **lora_kwargs) -> str:
    """Save a PEFT LoRA adapter of `base` with random, non-zero A and B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=8 * r, target_modules="all-linear", init_lora_weights=False, **lora_kwargs
    )
    get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


@contextlib.contextmanager
def running(adapter_set, adapters=None, **kwargs) -> Iterator:
    """A real server (uvicorn, loopback, an ephemeral port) around `adapter_set`, stopped on exit.

    `serve` returns once uvicorn has started (a readiness event, no sleep); the port was bound before."""
    from qlora_lite.inference.server import serve

    handle = serve(adapter_set, adapters, port=0, background=True, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()


def client(handle, api_key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=handle.url, api_key=api_key, max_retries=0, timeout=120)


def post(handle, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict | str]:
    """A raw POST (for bodies the openai client will not send): (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = handle.url.removesuffix("/v1") + path
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def get(handle, path: str, headers: dict | None = None) -> tuple[int, dict]:
    url = handle.url.removesuffix("/v1") + path
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=60
        ) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_openai_error(status: int, body, expected: int) -> dict:
    """The body is OpenAI's error object and nothing else (no traceback, no extra keys)."""
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]
    return error
