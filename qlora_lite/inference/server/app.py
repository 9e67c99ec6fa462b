"""The HTTP face of the engine: OpenAI's routes (models, chat, completions), vLLM's LoRA and classify routes.

Handlers only validate, queue and wait: every model call happens on the engine thread. Each wait ends in
an answer, a timeout (504), or the client leaving (its job is withdrawn so its place is free again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse

import qlora_lite.inference.server.schemas as schemas
from qlora_lite.inference.server.engine import Engine, Job, Sampling, call_job, unknown_model
from qlora_lite.inference.server.errors import APIError, install_error_handlers
from qlora_lite.inference.server.guard import Guard

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed the connection while its request waited."""


async def _disconnected(request: Request) -> None:
    # The body is already read: the next message on this connection can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    timeout: float = 300.0,
    runtime_lora: bool = True,
) -> FastAPI:
    """The ASGI app around `engine` (started and stopped with the app's lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="qlora-lite", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    started = int(time.time())

    async def wait(job: Job, awaitable: Any, request: Request, deadline: float) -> Any:
        """`awaitable`'s result, unless the deadline passes (504) or the client leaves first."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {task, gone},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if task in done:
                return task.result()
            engine.withdraw(job)
            if gone in done:
                raise ClientGone
            raise APIError(
                504, f"no answer within the server's timeout of {timeout:g} s: ask for fewer max_tokens, "
                "or start the server with a longer --timeout", code="timeout",
            )  # fmt: skip
        finally:
            for t in (task, gone):
                if not t.done():
                    t.cancel()

    def sampling_of(body: schemas._Sampling) -> Sampling:
        asked = body.max_new_tokens
        if asked is not None and asked > engine.max_tokens:
            raise APIError(
                400, f"max_tokens {asked} is above this server's cap of {engine.max_tokens}: ask for fewer "
                "(or start the server with a larger --max-tokens)", param="max_tokens",
            )  # fmt: skip
        return Sampling(
            asked, body.temperature, body.top_p, tuple(body.stop) if body.stop else None, body.seed
        )

    def check_model(name: str) -> None:
        if not engine.known_model(name):
            raise unknown_model(name, engine.model_names())

    async def answer(request: Request, body: schemas._Sampling, prompt: Any, route_text: str | None):
        deadline = time.monotonic() + timeout
        check_model(body.model)
        chat = isinstance(body, schemas.ChatCompletionRequest)
        kind = "stream" if body.stream else "generate"
        job = engine.submit(Job(kind, body.model, prompt, sampling_of(body), route_text or _text_of(prompt)))
        try:
            if not body.stream:
                result = await wait(job, job.future, request, deadline)
                return (schemas.chat_completion if chat else schemas.text_completion)(result)
            # Wait for the engine to accept the request (model, context checks) before the 200 goes out:
            # an unknown model or an over-long prompt is an HTTP error, not an event inside a stream.
            kind, value = await wait(job, job.events.get(), request, deadline)
        except ClientGone:
            return Response(status_code=499)
        if kind == "error":
            raise value
        writer = schemas.ChunkWriter(chat=chat, model=value[0])
        return EventSourceResponse(
            _events(engine, job, writer, body.include_usage_chunk, deadline), ping=15, send_timeout=30
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if engine.alive else 503
        body = {"status": "ok" if engine.alive else "stopped", "waiting": engine.waiting, **engine.stats}
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_card(engine, name, started) for name in engine.model_names()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return _card(engine, name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        return await answer(request, body, body.prompt(), body.route_text())

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request):
        return await answer(request, body, body.as_prompt(), None)

    @app.post("/v1/classify")
    async def classify(body: schemas.ClassifyRequest, request: Request):
        check_model(body.model)
        job = engine.submit(Job("classify", body.model, body.input, route_text=body.input[0]))
        try:
            results, tokens, name = await wait(job, job.future, request, time.monotonic() + timeout)
        except ClientGone:
            return Response(status_code=499)
        return schemas.classification(name, results, tokens)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: schemas.LoadLoraRequest, request: Request):
        _runtime_lora(runtime_lora)
        name, path = body.lora_name, body.lora_path
        if engine.known_model(name):
            raise APIError(400, f"an adapter named {name!r} is already loaded: unload it first or pick another name", param="lora_name")  # fmt: skip
        job = engine.submit(call_job(lambda adapters: adapters.load(name, path)))
        await wait(job, job.future, request, time.monotonic() + timeout)
        log.info("loaded adapter %s from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: schemas.UnloadLoraRequest, request: Request):
        _runtime_lora(runtime_lora)
        name = body.lora_name
        if name not in engine.adapters.names:
            raise APIError(404, f"no adapter named {name!r} is loaded: GET /v1/models lists them", param="lora_name")  # fmt: skip
        job = engine.submit(call_job(lambda adapters: adapters.unload(name)))
        await wait(job, job.future, request, time.monotonic() + timeout)
        log.info("unloaded adapter %s", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


async def _events(
    engine: Engine, job: Job, writer: schemas.ChunkWriter, usage_chunk: bool, deadline: float
) -> AsyncIterator[str]:
    """The `data:` lines of one stream; leaving early (the client went away) withdraws the job."""
    first = True
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                engine.withdraw(job)
                yield json.dumps(
                    APIError(504, "no answer within the server's timeout", code="timeout").body()
                )
                return
            if kind == "delta":
                yield json.dumps(writer.delta(value, first=first))
                first = False
            elif kind == "done":
                if first:  # an empty answer still opens with the assistant's role, as OpenAI's streams do
                    yield json.dumps(writer.delta("", first=True))
                yield json.dumps(writer.finish(value))
                if usage_chunk:
                    yield json.dumps(writer.usage_only(value))
                yield "[DONE]"
                return
            elif kind == "error":
                body = value.body() if isinstance(value, APIError) else APIError(500, "internal error").body()
                yield json.dumps(body)
                return
    finally:
        engine.withdraw(job)  # a no-op after "done"; frees the engine when the client left mid-stream


def _text_of(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _runtime_lora(enabled: bool) -> None:
    if not enabled:
        raise APIError(404, "loading adapters at run time is switched off on this server (--no-runtime-lora)")


def _card(engine: Engine, name: str, created: int) -> dict[str, Any]:
    adapters = engine.adapters
    if name == adapters.base_id:
        return schemas.model_card(name, root=name, parent=None, created=created, task="causal_lm")
    if name == "auto":
        return schemas.model_card(
            name,
            root="router",
            parent=adapters.base_id,
            created=created,
            task="causal_lm",
            routes_to=adapters.names,
        )
    info = adapters.info(name)
    return schemas.model_card(
        name, root=str(info.get("source", name)), parent=adapters.base_id, created=created,
        task=info.get("task", "causal_lm"),
    )  # fmt: skip
