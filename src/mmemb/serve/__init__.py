"""OpenAI-compatible embedding server: ``create_app(embedder, settings)`` and ways to run it.

``ServeSettings`` is light to import (the CLI reads its defaults); the app and the runners pull in
FastAPI and uvicorn, so they are imported on first use.
"""

from .settings import ServeSettings

_LAZY = {"create_app": "app", "run_server": "server", "serve_in_thread": "server"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ServeSettings", "create_app", "run_server", "serve_in_thread"]
