"""The FastAPI app: ``POST /v1/embeddings`` (OpenAI-compatible), ``GET /v1/models``, ``GET /health``."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..items import Item, ItemError, check_text
from ..model.embedder import REASONING_MODES, Encoded, finish_vectors
from ..model.token_count import count_tokens
from .batcher import BatcherClosed, BatcherFull, DynamicBatcher
from .errors import APIError
from .inputs import SourcePolicy, UrlFetcher, load_images, parse_input, resolve_sources
from .settings import ServeSettings

LARGE_BYTES = 1 << 20
LARGE_TEXT = 20_000  # characters in a request beyond which its tokens are counted off the event loop


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, plus mmemb's ``reasoning`` and a default ``instruction``."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    reasoning: Literal["auto", "always", "never"] = "auto"
    instruction: str | None = None  # for items that bring none


def create_app(embedder: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The server app around an embedder (anything with ``encode`` and ``dim``, used by one thread)."""
    settings = settings or ServeSettings()
    batcher = DynamicBatcher(embedder, settings.max_batch_size, settings.max_wait_ms, settings.max_queued_items,
                             settings.max_batch_tokens)
    policy = SourcePolicy(local_root=_checked_root(settings.allow_local_root))
    backbone = getattr(embedder, "backbone", None)  # None: an embedder that cannot count tokens
    if settings.max_input_tokens is None and backbone is not None:
        settings.max_input_tokens = backbone.config.text_config.max_position_embeddings
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        if settings.allow_urls:
            policy.fetcher = UrlFetcher(settings.max_body_bytes, settings.url_timeout_s, settings.allow_private_urls)
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish; anything still queued is served too
            await batcher.close()
            if policy.fetcher is not None:
                await policy.fetcher.aclose()

    app = FastAPI(title="mmemb embedding server", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):  # a bug or the model failing, not the input
        # (Starlette re-raises it after this answer, and uvicorn logs the traceback.)
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    async def check_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send the header 'Authorization: Bearer KEY')")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "dim": embedder.dim, **batcher.stats()}

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": int(started),
                                            "owned_by": "mmemb", "max_model_len": settings.max_input_tokens}]}

    @app.post("/v1/embeddings", dependencies=[Depends(check_api_key)])
    async def embeddings(request: Request) -> Response:
        body = await _read_body(request, settings.max_body_bytes)
        try:
            req = await _off_loop_if_large(len(body), EmbeddingRequest.model_validate_json, body)
        except ValidationError as e:
            raise APIError(400, _validation_message(e)) from None
        if req.model is not None and req.model not in settings.accepted_names:
            also = ", ".join(map(repr, settings.aliases)) or "none"
            raise APIError(404, f"model {req.model!r} is not served here; this server serves "
                                f"{settings.model_name!r} (also accepted: {also})", "model", "model_not_found")
        if req.dimensions is not None and not 1 <= req.dimensions <= embedder.dim:
            raise APIError(400, f"dimensions must be between 1 and {embedder.dim} (this model's embeddings), "
                                f"not {req.dimensions}", "dimensions")
        try:
            res = await asyncio.wait_for(_embed(req), settings.request_timeout_s)
        except asyncio.TimeoutError:  # the request's items still queued are withdrawn
            raise APIError(504, f"the request took longer than {settings.request_timeout_s:g}s") from None
        if req.dimensions is not None and req.dimensions < embedder.dim:  # Matryoshka: truncate, re-normalise
            res.embeddings = finish_vectors(res.embeddings, req.dimensions)
        content = await _off_loop_if_large(res.embeddings.nbytes, _response_json, req, res, settings.model_name)
        return Response(content, media_type="application/json")

    def prepare(items: list[Item]) -> list[int] | None:
        """Check the texts, decode the images (over the pixel limit or corrupt: 400) and count each
        item's tokens (an item the processor refuses: 400)."""
        try:
            for i, item in enumerate(items):
                check_text(item)
            if any(item.has_visual for item in items):
                load_images(items, settings.max_image_pixels)
            return count_tokens(backbone, items) if backbone is not None else None
        except ItemError as e:
            where = f"input[{i if e.index is None else e.index}]"
            raise APIError(400, f"{where}: {e.reason}", where) from None

    async def _embed(req: EmbeddingRequest) -> Encoded:
        items = parse_input(req.input, req.instruction, settings.max_items)
        await resolve_sources(items, policy)
        text = sum(len(item.text or "") for item in items)
        if text > LARGE_TEXT or any(item.has_visual for item in items):
            tokens = await asyncio.to_thread(prepare, items)
        else:
            tokens = prepare(items)
        limit = settings.max_input_tokens
        for i, n in enumerate(tokens or []):
            if limit is not None and n > limit:  # refused before any model work
                raise APIError(400, f"input[{i}]: {n} tokens exceed this server's limit of {limit} tokens per "
                                    "input (--max-input-tokens)", f"input[{i}]", "context_length_exceeded")
        try:
            res = await batcher.submit(items, tokens, mode=REASONING_MODES[req.reasoning],
                                       think_threshold=settings.think_threshold,
                                       max_reasoning_tokens=settings.max_reasoning_tokens)
        except BatcherFull as e:
            raise APIError(503, f"the server is busy ({e}); retry later") from None
        except BatcherClosed as e:
            raise APIError(503, str(e)) from None
        if res.errors:
            errors = sorted(res.errors, key=lambda e: e.index)
            raise APIError(400, "; ".join(f"input[{e.index}]: {e.reason}" for e in errors[:5]),
                           f"input[{errors[0].index}]")
        return res

    return app


def _response_json(req: EmbeddingRequest, res: Encoded, model_name: str) -> bytes:
    data = []
    for i, vec in enumerate(res.embeddings):
        if req.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            embedding: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding,
                     "reasoned": bool(res.reasoned[i]), "rationale": res.rationales[i]})
    prompt, generated = int(res.prompt_tokens.sum()), int(res.generated_tokens.sum())
    body = {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": prompt, "generated_tokens": generated, "total_tokens": prompt + generated}}
    return json.dumps(body).encode()


async def _off_loop_if_large(size: int, fn, *args):
    """Run ``fn`` in a thread when its input is large (parsing or writing megabytes of JSON would
    stall every other request on the event loop); small ones are cheaper done in place."""
    if size > LARGE_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "invalid request: " + "; ".join(parts)


def _checked_root(root: str | None) -> Path | None:
    if root is None:
        return None
    path = Path(root).resolve()
    if not path.is_dir():
        raise ValueError(f"--allow-local-root {root!r} is not a folder")
    return path
