"""`serve(...)`: load the base and its adapters once, then answer OpenAI-style HTTP requests.

In a notebook it runs in a background thread and returns a handle (`.url`, `.stop()`); from the command
line it runs in the foreground until Ctrl-C. Importing this module needs nothing beyond the core; the
server's own packages (FastAPI, uvicorn, sse-starlette) are the `serve` extra, imported when serving.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

API_KEY_ENV = "QLORA_LITE_API_KEY"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how much may wait; every number has a command-line flag."""

    max_batch: int = 8  # requests answered by one generate call
    max_queue: int = 64  # requests waiting beyond that: one more is answered 429
    max_tokens: int = 512  # the cap on max_tokens (and the default when a request names none)
    timeout: float = 300.0  # seconds from arrival to the last token
    max_body_bytes: int = 1 << 20
    batch_wait: float = 0.02  # seconds the engine waits for more requests to join a batch


@dataclass
class ServerHandle:
    """A server running in a background thread: `.url` for clients, `.stop()` when done."""

    host: str
    port: int
    _server: Any = field(repr=False, default=None)
    _thread: threading.Thread | None = field(repr=False, default=None)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stop(self, timeout: float = 60.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"serving needs the 'serve' extra ({exc.name} is missing): pip install 'qlora-lite[serve]'"
        ) from None


def resolve_api_key(api_key: str | None) -> str | None:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return key or None


def resolve_host(host: str | None, api_key: str | None) -> str:
    """Loopback unless asked otherwise; asked otherwise without a key, say what that exposes."""
    if host is None:
        return LOOPBACK
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the model "
            "(set --api-key or %s)", host, API_KEY_ENV,
        )  # fmt: skip
    return host


def load_router(router: Any, adapter_set: Any) -> Any:
    """The router (an object, or loaded from its file), checked against the adapters being served."""
    if router is None:
        return None
    if isinstance(router, (str, os.PathLike)):
        from qlora_lite.inference.router import Router

        router = Router.load(router)
    missing = [name for name in router.adapters if name not in adapter_set.names]
    if missing:
        raise UserError(
            f"the router sends requests to {', '.join(missing)}, which this server does not serve: "
            f"add --adapter {missing[0]}=RUN_FOLDER (or rebuild the router for these adapters)"
        )
    if router.kind == "classifier":
        # A classifier router whose run is one of the served adapters classifies on the loaded base.
        wanted = os.path.realpath(router.state["classifier"])
        for name in adapter_set.names:
            if os.path.realpath(str(adapter_set.info(name).get("folder", ""))) == wanted:
                router.bind_classifier(lambda text, name=name: adapter_set.classify([text], name)[0])
    return router


def build_app(
    model: Any,
    adapters: Mapping[str, str] | None = None,
    *,
    router: Any = None,
    api_key: str | None = None,
    limits: Limits = Limits(),
    runtime_lora: bool = True,
    quantization: str | None = None,
    revision: str | None = None,
):
    """The ASGI app for `model` (a base path / Hub id, or an `AdapterSet` already loaded)."""
    _require_extra()
    from qlora_lite.inference.adapters import AdapterSet
    from qlora_lite.inference.server.app import create_app
    from qlora_lite.inference.server.engine import Engine

    if isinstance(model, AdapterSet):
        adapter_set = model
        for name, path in (adapters or {}).items():
            adapter_set.load(name, path)
    else:
        adapter_set = AdapterSet(model, adapters, revision=revision, quantization=quantization)
    engine = Engine(
        adapter_set, router=load_router(router, adapter_set),
        max_batch=limits.max_batch, max_queue=limits.max_queue, max_tokens=limits.max_tokens,
        batch_wait=limits.batch_wait,
    )  # fmt: skip
    return create_app(
        engine, api_key=api_key, max_body_bytes=limits.max_body_bytes, timeout=limits.timeout,
        runtime_lora=runtime_lora,
    )  # fmt: skip


def serve(
    model: Any = None,
    adapters: Mapping[str, str] | None = None,
    *,
    router: Any = None,
    api_key: str | None = None,
    host: str | None = None,
    port: int = 8000,
    limits: Limits = Limits(),
    runtime_lora: bool = True,
    quantization: str | None = None,
    revision: str | None = None,
    background: bool | None = None,
) -> ServerHandle:
    """Serve `model` (base path / Hub id / loaded `AdapterSet`) and `adapters` ({name: run folder or Hub id}).

    `background` (default: True inside a notebook) runs the server in a thread and returns at once;
    otherwise this blocks until Ctrl-C. `port=0` takes a free port (read it from the handle).
    """
    api_key = resolve_api_key(api_key)
    host = resolve_host(host, api_key)
    app = build_app(
        model, adapters, router=router, api_key=api_key, limits=limits, runtime_lora=runtime_lora,
        quantization=quantization, revision=revision,
    )  # fmt: skip
    if background is None:
        background = _in_notebook()
    return run_app(app, host, port, background=background)


def run_app(app: Any, host: str, port: int, *, background: bool, log_level: str = "warning") -> ServerHandle:
    """Run `app` with uvicorn on a socket bound here (so the port is known, and taken, before it starts)."""
    import uvicorn

    sock = _bind(host, port)
    port = sock.getsockname()[1]
    ready = threading.Event()

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            ready.set()

    server = _Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    handle = ServerHandle(host, port, server)
    if not background:
        log.info("serving on %s (Ctrl-C stops)", handle.url)
        server.run(sockets=[sock])
        return handle
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="qlora-lite-serve", daemon=True
    )
    handle._thread = thread
    thread.start()
    while not ready.wait(
        0.5
    ):  # the model is loaded already: this is uvicorn's own start, well under a second
        if not thread.is_alive():
            raise UserError(f"the server on {handle.url} stopped while starting: see the log above")
    log.info("serving on %s%s", handle.url, _colab_note(port))
    return handle


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def _colab_note(port: int) -> str:
    if "google.colab" not in sys.modules:
        return ""
    return (
        f"\nIn Colab this address is reachable from this notebook only. For a browser URL: "
        f"`from google.colab.output import eval_js; print(eval_js('google.colab.kernel.proxyPort({port})'))` "
        "(it works only in your own signed-in browser); for other machines use a tunnel, with --api-key set."
    )
