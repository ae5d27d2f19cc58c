"""Shared by the tests that start several processes: their environment, one-thread reference runs, a free port."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# each launched process: the worktree's source, one thread (as `--num-processes` gives it)
ENV = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), OMP_NUM_THREADS="1")


@contextlib.contextmanager
def one_thread():
    """Reference runs in this process use one thread, as each launched process does (same arithmetic, same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
