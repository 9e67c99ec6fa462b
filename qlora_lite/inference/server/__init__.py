"""An OpenAI-compatible HTTP server for a base model and its adapters (`serve(...)`, `qlora-lite serve`).

Only `launch` is imported here: it needs nothing beyond the core; the app modules need the `serve` extra.
"""

from qlora_lite.inference.server.launch import Limits, ServerHandle, build_app, serve

__all__ = ["Limits", "ServerHandle", "build_app", "serve"]
