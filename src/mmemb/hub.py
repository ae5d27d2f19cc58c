"""The Hugging Face hub: whether it can be reached, so that hub names fail fast and clearly offline."""

from __future__ import annotations

import os
import socket


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE=1`` or the hub's host cannot be reached on port 443."""
    return os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()


def hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
