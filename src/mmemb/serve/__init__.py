"""OpenAI-compatible embedding server: ``create_app(embedder, settings)`` and ways to run it."""

from .app import create_app
from .server import run_server, serve_in_thread
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run_server", "serve_in_thread"]
