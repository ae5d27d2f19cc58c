"""Dynamic batching: the items of concurrent requests are merged into model batches.

Each item waits in the queue of its encode settings (e.g. reasoning mode: different settings
never share a batch) and of its length class (its token count within a factor of 4; up to 256
tokens, one class), so a short item is never padded to a long one's length. A queue is ready when
it holds ``max_batch_size`` items or ``max_batch_tokens`` padded tokens (items × the longest), or
when its oldest item has waited ``max_wait_ms``. Ready queues take turns (the one served longest
ago goes first), so a stream of long items holds short ones back by at most one batch per queue.

Model work runs in one worker thread, so the event loop keeps taking requests meanwhile, and those
form the next batches: under load, batches fill up by themselves. A request's items may spread
over several batches; when its caller gives up (a timeout), its items still queued are dropped, so
abandoned work stops after the batch in flight. A bad item fails only its own request
(``encode(on_error="skip")``, errors mapped back).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ..items import Item, ItemError
from ..model.embedder import Encoded

SHORT_TOKENS = 256  # items up to this long share one length class


class BatcherClosed(RuntimeError):
    """The batcher is draining for shutdown and takes no new requests."""


class BatcherFull(RuntimeError):
    """Too many items are queued; the request should be retried later."""


@dataclass
class _Job:
    """One request: its items and, as batches finish, each item's (batch result, row)."""

    items: list[Item]
    future: asyncio.Future
    rows: list[tuple[Encoded, int] | None] = field(default_factory=list)
    left: int = 0


@dataclass
class _Entry:
    """One queued item."""

    job: _Job
    index: int
    tokens: int
    arrived: float


def length_class(tokens: int) -> int:
    """0 up to SHORT_TOKENS, then one class per factor of 4."""
    return max(0, ((tokens - 1).bit_length() - SHORT_TOKENS.bit_length() + 2) // 2)


class DynamicBatcher:
    def __init__(self, embedder: Any, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queued_items: int = 8192, max_batch_tokens: int = 16384):
        self.embedder = embedder
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queued_items = max_queued_items
        self.batches = self.requests = self.items = 0  # served so far
        self.queued_items = 0
        self._queues: dict[tuple, deque[_Entry]] = {}  # (settings, length class) -> its items, oldest first
        self._last_turn: dict[tuple, int] = {}  # the turn at which each queue was last served
        self._turns = 0
        self._closing = False
        self._task: asyncio.Task | None = None

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "requests": self.requests, "items": self.items,
                "queued_items": self.queued_items}

    async def start(self) -> None:
        self._closing = False
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mmemb-model")
        self._task = asyncio.create_task(self._loop(), name="mmemb-batcher")

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, stop the worker."""
        self._closing = True
        if self._task is not None:
            self._arrived.set()
            await self._task
            self._executor.shutdown(wait=True)
            self._task = None

    async def submit(self, items: list[Item], tokens: list[int] | None = None, **encode_kw: Any) -> Encoded:
        """Encode ``items`` (``tokens``: each one's length, for batching) in shared batches; the
        result is aligned with ``items``. Cancelling the caller (e.g. a timeout) withdraws the
        items still queued."""
        if self._closing or self._task is None:
            raise BatcherClosed("the server is shutting down" if self._closing else "the batcher is not started")
        if self.queued_items + len(items) > self.max_queued_items:
            raise BatcherFull(f"{self.queued_items} items are queued (limit {self.max_queued_items})")
        loop = asyncio.get_running_loop()
        job = _Job(items, loop.create_future(), [None] * len(items), len(items))
        settings, now = tuple(sorted(encode_kw.items())), loop.time()
        for i, n in enumerate(tokens or [1] * len(items)):
            self._queues.setdefault((settings, length_class(n)), deque()).append(_Entry(job, i, n, now))
        self.queued_items += len(items)
        self._arrived.set()
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queues:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            now = loop.time()
            ready = [k for k in self._queues if self._ready(self._queues[k], now)]
            if not ready:  # wait for more items or for the oldest item's deadline
                deadline = min(q[0].arrived for q in self._queues.values()) + self.max_wait
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), max(0.0, deadline - now))
                except asyncio.TimeoutError:
                    pass
                continue
            key = min(ready, key=lambda k: (self._last_turn.get(k, -1), self._queues[k][0].arrived))
            batch = self._take(key)
            if batch:
                await self._run(key[0], batch)

    def _ready(self, queue: deque[_Entry], now: float) -> bool:
        if self._closing or now >= queue[0].arrived + self.max_wait:
            return True
        longest = 0
        for n, entry in enumerate(queue, 1):
            longest = max(longest, entry.tokens)
            if n >= self.max_batch_size or n * longest >= self.max_batch_tokens:
                return True
        return False

    def _take(self, key: tuple) -> list[_Entry]:
        """Pop up to one batch of live items from a queue (at least one item)."""
        queue, batch, longest = self._queues.pop(key), [], 0
        self._turns += 1
        self._last_turn[key] = self._turns
        while queue and len(batch) < self.max_batch_size:
            entry = queue[0]
            if batch and (len(batch) + 1) * max(longest, entry.tokens) > self.max_batch_tokens:
                break
            queue.popleft()
            self.queued_items -= 1
            if not entry.job.future.done():  # done here: withdrawn (timed out) or failed
                batch.append(entry)
                longest = max(longest, entry.tokens)
        if queue:
            self._queues[key] = queue
        return batch

    async def _run(self, settings: tuple, batch: list[_Entry]) -> None:
        items = [e.job.items[e.index] for e in batch]
        encode = partial(self.embedder.encode, items, batch_size=len(items), on_error="skip", **dict(settings))
        try:
            res = await asyncio.get_running_loop().run_in_executor(self._executor, encode)
        except Exception as e:  # not an item's fault (those are skipped): every request in the batch fails
            for entry in batch:
                if not entry.job.future.done():
                    entry.job.future.set_exception(e)
            return
        self.batches += 1
        self.items += len(items)
        for k, entry in enumerate(batch):
            job = entry.job
            if job.future.done():
                continue
            job.rows[entry.index] = (res, k)
            job.left -= 1
            if job.left == 0:
                self.requests += 1
                job.future.set_result(_gather(job.rows))


def _gather(rows: list[tuple[Encoded, int]]) -> Encoded:
    """One request's results, row by row from the batches that encoded its items."""
    failed = {id(res): {e.index: e for e in res.errors} for res, _ in rows}

    def pick(name: str) -> np.ndarray:
        return np.stack([getattr(res, name)[k] for res, k in rows])

    errors = [ItemError(i, e.item_id, e.reason) for i, (res, k) in enumerate(rows)
              if (e := failed[id(res)].get(k)) is not None]
    return Encoded(
        embeddings=pick("embeddings"), reasoned=pick("reasoned"), rationales=[res.rationales[k] for res, k in rows],
        rationale_token_ids=[res.rationale_token_ids[k] for res, k in rows], p_think=pick("p_think"),
        prompt_tokens=pick("prompt_tokens"), generated_tokens=pick("generated_tokens"), ok=pick("ok"),
        errors=errors, seconds=max(res.seconds for res, _ in rows),
    )
