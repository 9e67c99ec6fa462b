"""The one thread that touches the model: a bounded queue of requests, run in batches of compatible ones.

Why one thread: PEFT's active adapter, the KV cache and the tokenizer are shared state, so every model
call happens here, in order. Concurrency comes from batching instead: when the thread is free it takes the
oldest waiting request and every other waiting request that can share its `generate` call (same decoding
settings), each row carrying its own adapter name (`AdapterSet.generate(prompts, adapters=[...])`). Rows
never switch a global adapter, so one request cannot see another's adapter.

The queue is bounded: a request that finds it full is refused at once (429) instead of growing memory.
A request withdrawn by its handler (timeout, client gone) leaves the queue, or, while streaming, stops at
the next token.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.inference.server.errors import APIError, from_user_error
from qlora_lite.inference.server.schemas import Answer

log = logging.getLogger(__name__)

AUTO = "auto"  # the model name that asks the router


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int | None  # None: as many as the server's cap and the context allow
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] | None = None
    seed: int | None = None

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one `generate` call; None: this one runs alone."""
        if self.temperature == 0:
            return ("greedy", self.max_new_tokens, self.stop)  # greedy ignores top_p and seed
        if self.seed is not None:
            return None  # a seeded sample must not depend on which other rows shared its batch
        return ("sample", self.max_new_tokens, self.temperature, self.top_p, self.stop)

    def kwargs(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop) if self.stop else None,
            "seed": self.seed,
        }


@dataclass(eq=False)
class Job:
    """One request on its way through the queue. `kind`: generate | stream | classify | call."""

    kind: str
    model: str = ""
    payload: Any = None  # a prompt, a list of texts, or (for "call") a function of the AdapterSet
    sampling: Sampling | None = None
    route_text: str | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    future: asyncio.Future = field(init=False)
    events: asyncio.Queue = field(init=False)  # a stream's ("started"|"delta"|"done"|"error", value)
    cancelled: threading.Event = field(default_factory=threading.Event)
    adapter: str | None = None  # resolved by the engine thread
    answer_name: str = ""
    route: dict[str, Any] | None = None
    asked_key: tuple | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()
        self.events = asyncio.Queue()
        # The settings as asked (before the engine fills in a missing max_tokens): who may share a batch.
        self.asked_key = self.sampling.batch_key() if self.kind == "generate" and self.sampling else None

    # Called from the engine thread: hand results to the event loop that owns the request.
    def resolve(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, value, None)

    def fail(self, exc: BaseException) -> None:
        if self.kind == "stream":  # a stream's handler reads only its events
            self.emit("error", exc)
        else:
            self.loop.call_soon_threadsafe(_settle, self.future, None, exc)

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def _settle(future: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if future.done():  # the handler gave up (timeout, client gone): nobody is waiting
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class Engine:
    """Owns the `AdapterSet` (and the optional router) and the thread that runs them."""

    def __init__(
        self,
        adapters: Any,
        *,
        router: Any = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_tokens: int = 512,
        batch_wait: float = 0.02,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_tokens < 1:
            raise UserError("max_batch, max_queue and max_tokens must each be at least 1")
        self.adapters, self.router = adapters, router
        self.max_batch, self.max_queue, self.max_tokens = max_batch, max_queue, max_tokens
        # Clients that send together arrive a few milliseconds apart: waiting this long (seconds) for them
        # before a generate call that takes seconds turns a trickle of single rows into one batch.
        self.batch_wait = batch_wait
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = dict.fromkeys(
            ("served", "failed", "refused", "batches", "batched_rows", "mixed_batches", "streams_stopped"), 0
        )

    # ---- the event loop's side -------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="qlora-lite-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in waiting:
            job.fail(APIError(503, "the server is shutting down: retry against a running server"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> Job:
        """Queue `job`, or refuse it at once: 503 when stopped, 429 when the queue is full."""
        with self._cond:
            if not self.alive:
                raise APIError(503, "the server is not running requests (starting or shutting down)")
            if len(self._waiting) >= self.max_queue:
                self.stats["refused"] += 1
                raise APIError(
                    429,
                    f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue}): "
                    "retry shortly, or start the server with a larger --max-queue",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> None:
        """The handler no longer wants `job`: drop it from the queue, or stop its stream at the next token."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def known_model(self, name: str) -> bool:
        return (
            name == self.adapters.base_id
            or name in self.adapters.names
            or (name == AUTO and self.router is not None)
        )

    # ---- the engine thread's side ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - nothing may kill the engine thread
                for job in batch:
                    self._fail(job, exc)

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job, prepared, and the waiting jobs that can share its `generate` call."""
        with self._cond:
            if not self._waiting:
                return []
            head = self._waiting.popleft()
        if not self._prepare(head):
            return []
        batch = [head]
        key = head.sampling.batch_key() if head.asked_key is not None else None
        if key is not None and self.max_batch > 1:
            self._gather(time.monotonic() + self.batch_wait)
        skipped: set[int] = set()
        while key is not None and len(batch) < self.max_batch:
            with self._cond:
                job = next(
                    (j for j in self._waiting if j.asked_key == head.asked_key and id(j) not in skipped),
                    None,
                )
                if job is None:
                    break
                self._waiting.remove(job)
            if not self._prepare(job):
                continue
            if job.sampling.batch_key() == key:
                batch.append(job)
            else:  # same request but another resolved length: it waits for a later batch, in its place
                skipped.add(id(job))
                with self._cond:
                    self._waiting.appendleft(job)
        return batch

    def _gather(self, deadline: float) -> None:
        """Wait until the batch could be full, or the deadline, whichever comes first (no busy loop)."""
        with self._cond:
            while len(self._waiting) < self.max_batch - 1 and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _prepare(self, job: Job) -> bool:
        """Resolve the model name (and the router), check the task and the prompt length. False: failed."""
        if job.cancelled.is_set():
            return False
        try:
            if job.kind in ("generate", "stream", "classify"):
                self._resolve_model(job)
            if job.kind in ("generate", "stream"):
                self._fit_context(job)
        except BaseException as exc:  # noqa: BLE001
            self._fail(job, exc)
            return False
        if job.kind == "stream":
            job.emit("started", (job.answer_name, job.route))
        return True

    def _resolve_model(self, job: Job) -> None:
        adapters, name = self.adapters, job.model
        if name == AUTO and self.router is not None:
            chosen, score, reason = self.router.route(job.route_text or "")
            job.route = {"adapter": chosen, "score": float(score), "reason": reason}
            name = chosen if chosen is not None else adapters.base_id
        if name == adapters.base_id:
            job.adapter, job.answer_name = None, name
            task = "causal_lm"
        elif name in adapters.names:
            job.adapter, job.answer_name = name, name
            task = adapters.info(name).get("task", "causal_lm")
        else:
            raise unknown_model(name, self.model_names())
        if job.kind == "classify" and task != "classification":
            raise APIError(
                400, f"model {name!r} is not a classifier: use /v1/chat/completions", param="model"
            )
        if job.kind != "classify" and task == "classification":
            raise APIError(400, f"model {name!r} is a classifier: use POST /v1/classify", param="model")

    def _fit_context(self, job: Job) -> None:
        from qlora_lite.data.encoding import prompt_ids

        n = len(prompt_ids(job.payload, self.adapters.tokenizer))
        context = int(self.adapters.context_length)
        asked = job.sampling.max_new_tokens
        if n >= context or (asked is not None and n + asked > context):
            room = f"; max_tokens can be at most {context - n}" if n < context else ""
            raise APIError(
                422,
                f"the prompt is {n} tokens and max_tokens {asked or 1} more, but the model's context is "
                f"{context} tokens: shorten the prompt{room}",
                param="messages" if job.route_text is not None else "prompt",
                code="context_length_exceeded",
            )
        if asked is None:
            job.sampling = dataclasses.replace(job.sampling, max_new_tokens=min(self.max_tokens, context - n))

    def model_names(self) -> list[str]:
        return [self.adapters.base_id, *self.adapters.names] + ([AUTO] if self.router is not None else [])

    def _run(self, batch: list[Job]) -> None:
        head = batch[0]
        if head.kind == "generate":
            self._generate(batch)
        elif head.kind == "stream":
            self._stream(head)
        elif head.kind == "classify":
            results = self.adapters.classify(head.payload, head.adapter)
            tokens = sum(len(ids) for ids in self.adapters.tokenizer(list(head.payload))["input_ids"])
            head.resolve((results, tokens, head.answer_name))
        elif head.kind == "call":
            head.resolve(head.payload(self.adapters))
        self.stats["served"] += len(batch)

    def _generate(self, batch: list[Job]) -> None:
        results = self.adapters.generate(
            [job.payload for job in batch], [job.adapter for job in batch], **batch[0].sampling.kwargs()
        )
        self.stats["batches"] += 1
        self.stats["batched_rows"] += len(batch)
        self.stats["mixed_batches"] += len({job.adapter for job in batch}) > 1
        for job, result in zip(batch, results, strict=True):
            job.resolve(
                Answer(
                    result.text,
                    result.prompt_tokens,
                    result.completion_tokens,
                    result.finish_reason,
                    job.answer_name,
                    job.route,
                )  # fmt: skip
            )

    def _stream(self, job: Job) -> None:
        iterator = self.adapters.stream(job.payload, job.adapter, **job.sampling.kwargs())
        pieces: list[str] = []
        final = None
        try:
            while not job.cancelled.is_set():
                try:
                    piece = next(iterator)
                except StopIteration as end:
                    final = end.value  # a Completion, if the stream returns one
                    break
                pieces.append(piece)
                job.emit("delta", piece)
            else:
                self.stats["streams_stopped"] += 1
                log.info("a streaming client went away: its generation stopped after %d pieces", len(pieces))
                return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        job.emit("done", self._stream_answer(job, "".join(pieces), final))

    def _stream_answer(self, job: Job, text: str, final: Any) -> Answer:
        from qlora_lite.data.encoding import prompt_ids

        if final is not None and hasattr(final, "completion_tokens"):
            counts = (final.prompt_tokens, final.completion_tokens, final.finish_reason)
        else:
            tokenizer = self.adapters.tokenizer
            produced = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            limit = job.sampling.max_new_tokens
            counts = (
                len(prompt_ids(job.payload, tokenizer)),
                produced,
                "length" if produced >= limit else "stop",
            )
        return Answer(text, *counts, job.answer_name, job.route)

    def _fail(self, job: Job, exc: BaseException) -> None:
        self.stats["failed"] += 1
        if isinstance(exc, APIError):
            job.fail(exc)
        elif isinstance(exc, UserError):
            job.fail(from_user_error(exc))
        else:
            log.error("internal error in the engine thread", exc_info=exc)
            job.fail(APIError(500, "internal server error (the server log has the details)"))


def unknown_model(name: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"model {name!r} does not exist here: use one of {', '.join(repr(k) for k in known)} "
        "(GET /v1/models lists them)",
        param="model",
        code="model_not_found",
    )


def call_job(function: Callable[[Any], Any]) -> Job:
    """A job that runs `function(adapter_set)` on the engine thread (loading, unloading adapters)."""
    return Job("call", payload=function)
