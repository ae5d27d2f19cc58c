"""Dynamic batching: concurrent requests are merged into model batches.

Requests wait in one queue per encode setting (e.g. reasoning mode: different settings never
share a batch). A batch leaves when it holds ``max_batch_size`` items or when its oldest request
has waited ``max_wait_ms``. Model work runs in one worker thread, so the event loop keeps taking
requests meanwhile, and those form the next batch: under load, batches fill up by themselves.
A bad item fails only its own request (``encode(on_error="skip")``, errors mapped back).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..items import Item, ItemError
from ..model.embedder import Encoded


class BatcherClosed(RuntimeError):
    """The batcher is draining for shutdown and takes no new requests."""


class BatcherFull(RuntimeError):
    """Too many items are queued; the request should be retried later."""


@dataclass
class _Job:
    items: list[Item]
    key: tuple  # the encode settings, as sorted (name, value) pairs
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    def __init__(self, embedder: Any, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queued_items: int = 8192):
        self.embedder = embedder
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queued_items = max_queued_items
        self.batches = self.requests = self.items = 0  # served so far
        self.queued_items = 0
        self._pending: dict[tuple, deque[_Job]] = {}
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

    async def submit(self, items: list[Item], **encode_kw: Any) -> Encoded:
        """Encode ``items`` in a shared batch; the result is aligned with ``items``.

        Cancelling the caller (e.g. a timeout) withdraws the request if it is still queued.
        """
        if self._closing or self._task is None:
            raise BatcherClosed("the server is shutting down" if self._closing else "the batcher is not started")
        if self.queued_items + len(items) > self.max_queued_items:
            raise BatcherFull(f"{self.queued_items} items are queued (limit {self.max_queued_items})")
        loop = asyncio.get_running_loop()
        job = _Job(items, tuple(sorted(encode_kw.items())), loop.create_future(), loop.time())
        self._pending.setdefault(job.key, deque()).append(job)
        self.queued_items += len(items)
        self._arrived.set()
        return await job.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            key = min(self._pending, key=lambda k: self._pending[k][0].arrived)
            queue = self._pending[key]
            deadline = queue[0].arrived + self.max_wait
            while not self._closing and sum(len(j.items) for j in queue) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = self._take(key)
            if jobs:
                await self._run(key, jobs)

    def _take(self, key: tuple) -> list[_Job]:
        """Pop jobs of one setting, up to max_batch_size items (at least one job)."""
        queue, jobs, n = self._pending[key], [], 0
        while queue:
            job = queue[0]
            if not job.future.done() and jobs and n + len(job.items) > self.max_batch_size:
                break
            queue.popleft()
            self.queued_items -= len(job.items)
            if not job.future.done():  # done here: withdrawn (timed out) while queued
                jobs.append(job)
                n += len(job.items)
        if not queue:
            del self._pending[key]
        return jobs

    async def _run(self, key: tuple, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        encode = partial(self.embedder.encode, items, batch_size=self.max_batch_size, on_error="skip", **dict(key))
        try:
            res = await asyncio.get_running_loop().run_in_executor(self._executor, encode)
        except Exception as e:  # not an item's fault (those are skipped): every request of the batch fails
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.batches += 1
        self.requests += len(jobs)
        self.items += len(items)
        start = 0
        for job in jobs:
            stop = start + len(job.items)
            if not job.future.done():
                job.future.set_result(_slice(res, start, stop))
            start = stop


def _slice(res: Encoded, start: int, stop: int) -> Encoded:
    """The results of items start..stop, with error indices relative to start."""
    s = slice(start, stop)
    return Encoded(
        embeddings=res.embeddings[s], reasoned=res.reasoned[s], rationales=res.rationales[s],
        rationale_token_ids=res.rationale_token_ids[s], p_think=res.p_think[s],
        prompt_tokens=res.prompt_tokens[s], generated_tokens=res.generated_tokens[s], ok=res.ok[s],
        errors=[ItemError(e.index - start, e.item_id, e.reason) for e in res.errors if start <= e.index < stop],
        seconds=res.seconds,
    )
