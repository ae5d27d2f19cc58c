"""Running the app on uvicorn: in the foreground (``mmemb serve``) or in a thread (tests, bench)."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from typing import Iterator

import uvicorn
from fastapi import FastAPI


def _config(app: FastAPI, host: str, port: int, log_level: str, access_log: bool) -> uvicorn.Config:
    timeout = app.state.settings.request_timeout_s
    # On shutdown uvicorn stops accepting and waits for in-flight requests; they end within
    # their own timeout, so wait a little longer than that before cancelling anything.
    # Idle keep-alive connections live 30 s (uvicorn's 5 s default makes clients that pool
    # connections race the server's close more often).
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=math.ceil(timeout) + 5, timeout_keep_alive=30, lifespan="on")


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM, then finish in-flight requests and stop."""
    uvicorn.Server(_config(app, host, port, log_level, access_log=True)).run()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning",
                    startup_timeout_s: float = 30.0) -> Iterator[tuple[str, uvicorn.Server]]:
    """Serve ``app`` on a free port in a background thread; yields (base URL, server).

    On exit the server shuts down the way it does on SIGTERM (in-flight requests finish).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, host, port, log_level, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="mmemb-server")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=app.state.settings.request_timeout_s + 10)
        sock.close()
