"""Server settings: one object for every limit and switch of ``mmemb serve``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    model_name: str = "mmemb"  # the name served in /v1/models and accepted in requests' "model"
    # Dynamic batching: a model batch is sent when it holds max_batch_size items, or when its
    # oldest request has waited max_wait_ms.
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queued_items: int = 8192  # beyond this, new requests get 503 (back-pressure)
    # Limits of one request.
    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 256
    max_image_pixels: int = 4096 * 4096
    request_timeout_s: float = 60.0
    # Where images may come from besides data URLs (both off by default).
    allow_local_root: str | None = None
    allow_urls: bool = False
    url_timeout_s: float = 10.0
    api_key: str | None = None
    # Encoding options shared by all requests.
    think_threshold: float = 0.5
    max_reasoning_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queued_items", "max_body_bytes", "max_items", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
