"""Server settings: one object for every limit and switch of ``mmemb serve``."""

from __future__ import annotations

from dataclasses import dataclass

from ..defaults import MAX_IMAGE_PIXELS, MAX_REASONING_TOKENS, THINK_THRESHOLD


@dataclass
class ServeSettings:
    model_name: str = "mmemb"  # the name served in /v1/models and accepted in requests' "model"
    aliases: tuple[str, ...] = ()  # other names accepted in requests' "model" (e.g. the --model path)
    # Dynamic batching: a model batch is sent when it holds max_batch_size items or max_batch_tokens
    # tokens (counted with padding: items x the longest), or when its oldest item has waited max_wait_ms.
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queued_items: int = 8192  # beyond this, new requests get 503 (back-pressure)
    # Limits of one request.
    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 256
    max_input_tokens: int | None = None  # per item; None: the model's context length
    max_image_pixels: int = MAX_IMAGE_PIXELS
    request_timeout_s: float = 60.0
    # Where images may come from besides data URLs (all off by default).
    allow_local_root: str | None = None
    allow_urls: bool = False
    allow_private_urls: bool = False  # with allow_urls: also loopback, private and link-local addresses
    url_timeout_s: float = 10.0
    api_key: str | None = None
    # Encoding options shared by all requests.
    think_threshold: float = THINK_THRESHOLD
    max_reasoning_tokens: int = MAX_REASONING_TOKENS

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queued_items", "max_body_bytes", "max_items",
                     "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ValueError("max_input_tokens must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        self.aliases = tuple(self.aliases)

    @property
    def accepted_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.aliases)
