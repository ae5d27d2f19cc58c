"""Training data: a weighted mixture of Pair-JSONL datasets in a seeded, resumable order.

* :class:`PairSource` indexes one dataset's JSONL file(s) by line offset and reads rows on demand
  (a large dataset is never held in memory).
* :class:`BatchPlan` says which rows make global batch ``step``: a pure function of the seed and
  the step, so the data position in a checkpoint is just the step number.
* :class:`StepLoader` (a map-style ``torch`` dataset indexed by step) loads this process's share
  of a global batch: renders the prompts and opens the images. A pair whose row or image is bad
  is skipped with a named reason, counted in the log; the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.pairs import pair_files, pair_root
from ..items import DEFAULT_MAX_IMAGE_PIXELS, ImageError, Item, ItemError, Pair, load_visuals
from ..model.prompts import render_prompt
from .config import DatasetConfig

LABELS = {"reason": 1, "direct": 0}  # pair.label -> decision target; anything else: no decision loss


class PairSource:
    """The rows of one Pair-JSONL file, indexed by line offset and read on demand."""

    def __init__(self, path: str | Path, name: str, weight: float = 1.0, image_root: str | None = None):
        self.path, self.name, self.weight = str(path), name, weight
        self.image_root = str(image_root) if image_root is not None else str(pair_root(path))
        self._offsets = _line_offsets(self.path)
        if len(self._offsets) == 0:
            raise ValueError(f"dataset {self.path!r} has no rows")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, i: int) -> tuple[dict[str, Any], str]:
        """Row ``i`` as a dict, and where it is (for messages)."""
        pid = os.getpid()  # one handle per process (DataLoader workers fork)
        if pid not in self._handles:
            self._handles[pid] = open(self.path, "rb")
        fh = self._handles[pid]
        fh.seek(int(self._offsets[i]))
        return json.loads(fh.readline()), f"{self.path} row {i + 1}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def open_sources(datasets: list[DatasetConfig]) -> list[PairSource]:
    """One source per file: a glob or a benchmark folder (its ``train/*.jsonl``) gives one per task.

    Relative image paths resolve against ``image_root``, by default the benchmark folder that holds
    the file (see :func:`mmemb.data.pairs.pair_root`).
    """
    sources = []
    for d in datasets:
        files = pair_files(os.path.expanduser(d.path))
        for f in files:
            name = d.name or f.stem
            if d.name and len(files) > 1:
                name = f"{d.name}/{f.stem}"
            sources.append(PairSource(f, name, d.weight, d.image_root))
    return sources


def _line_offsets(path: str, block: int = 1 << 24) -> np.ndarray:
    """Byte offsets of the non-blank, newline-terminated lines (a killed writer's last line is left out)."""
    starts, pos = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            nl = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10).astype(np.int64) + pos + 1
            starts.append(nl)
            pos += len(chunk)
    starts = np.concatenate(starts)  # line k spans [starts[k], starts[k+1])
    lengths = np.diff(starts)
    return starts[:-1][lengths > 1]


class BatchPlan:
    """Global batches as (dataset, row) index arrays, a pure function of (seed, step).

    Each epoch draws ``round(weight * size)`` rows of every dataset (whole shuffled passes plus a
    random part for the fraction), then either shuffles all of them together into batches, or
    (``one_dataset_per_batch``) cuts each dataset into its own batches and shuffles the order of
    the batches. Incomplete last batches are dropped.
    """

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, one_dataset_per_batch: bool, seed: int):
        self.sizes, self.weights = list(sizes), list(weights)
        self.batch_size, self.homogeneous, self.seed = batch_size, one_dataset_per_batch, seed
        self.counts = [int(round(w * n)) for n, w in zip(self.sizes, self.weights)]
        if one_dataset_per_batch:
            self.steps_per_epoch = sum(c // batch_size for c in self.counts)
        else:
            self.steps_per_epoch = sum(self.counts) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the datasets ({dict(zip(range(len(sizes)), self.counts))} weighted rows) do not fill "
                             f"one batch of {batch_size}" + (" per dataset" if one_dataset_per_batch else ""))
        self._cached: tuple[int, np.ndarray] | None = None

    def batch(self, step: int) -> np.ndarray:
        """(batch_size, 2) int64: dataset index and row index of each pair in global batch ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._epoch(epoch))
        return self._cached[1][k]

    def _epoch(self, epoch: int) -> np.ndarray:
        draws = []
        for d, (n, c) in enumerate(zip(self.sizes, self.counts)):
            rng = np.random.default_rng([self.seed, epoch, d])
            rows = np.concatenate([rng.permutation(n) for _ in range(-(-c // n))])[:c]
            draws.append(np.stack([np.full(c, d), rows], 1))
        rng = np.random.default_rng([self.seed, epoch, len(self.sizes)])
        B = self.batch_size
        if not self.homogeneous:
            rows = np.concatenate(draws)[rng.permutation(sum(self.counts))]
            return rows[: self.steps_per_epoch * B].reshape(-1, B, 2)
        batches = np.concatenate([d[: (len(d) // B) * B].reshape(-1, B, 2) for d in draws if len(d) >= B])
        return batches[rng.permutation(len(batches))]


@dataclass
class Side:
    """One item ready for the model: rendered prompt, opened images, content key."""

    prompt: str
    visuals: tuple
    key: int  # hash of what the model sees (without the rationale): equal content, equal key


@dataclass
class LoadedPair:
    query: Side
    positive: Side
    negatives: list[Side]
    rationale: str | None  # teacher-forced reasoning for the query (None: no reasoning path)
    label: int  # 1 reason, 0 direct, -1 unlabelled
    id: str


@dataclass
class LocalBatch:
    """This process's share of one global batch."""

    step: int
    pairs: list[LoadedPair]
    skipped: list[str] = field(default_factory=list)  # "where: why" per pair left out


class StepLoader(torch.utils.data.Dataset):
    """``loader[step]`` -> this process's :class:`LocalBatch` of global batch ``step``."""

    def __init__(self, sources: list[PairSource], plan: BatchPlan, processor: Any, rank: int = 0, world: int = 1,
                 hard_negatives: int = 0, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.sources, self.plan, self.processor = sources, plan, processor
        self.rank, self.world = rank, world
        self.hard_negatives, self.max_image_pixels = hard_negatives, max_image_pixels
        self._prompts: dict[tuple, str] = {}

    def __len__(self) -> int:  # unbounded in principle; the sampler picks the steps
        return 1 << 62

    def __getitem__(self, step: int) -> LocalBatch:
        rows = np.array_split(self.plan.batch(step), self.world)[self.rank]
        out = LocalBatch(step=step, pairs=[])
        for d, r in rows.tolist():
            source = self.sources[d]
            where = f"{source.path} row {r + 1}"
            try:
                row, where = source.read(r)
                out.pairs.append(self._load(Pair.from_json(row, source.image_root), where))
            except (ImageError, ItemError, ValueError, KeyError, TypeError, OSError) as e:
                out.skipped.append(f"{where}: {e}")
        return out

    def _load(self, pair: Pair, where: str) -> LoadedPair:
        def side(item: Item, what: str) -> Side:
            try:
                visuals = load_visuals(item, self.max_image_pixels)
                plain = replace(item, rationale=None)
                return Side(self._prompt(plain), visuals, content_key(plain))
            except (ImageError, ItemError) as e:
                raise ItemError(None, pair.id, f"{what}: {getattr(e, 'reason', e)}") from None

        return LoadedPair(
            query=side(pair.query, "query"),
            positive=side(pair.positive, "positive"),
            negatives=[side(n, f"negative {k}") for k, n in enumerate(pair.negatives[: self.hard_negatives])],
            rationale=pair.query.rationale,
            label=LABELS.get(pair.label or "", -1),
            id=pair.id or where,
        )


    def _prompt(self, item: Item) -> str:
        """The rendered chat prompt; cached, since a template render costs more than the rest of a row."""
        key = (item.instruction, item.text, len(item.images), bool(item.video))
        prompt = self._prompts.get(key)
        if prompt is None:
            if len(self._prompts) >= 200_000:
                self._prompts.clear()
            prompt = self._prompts[key] = render_prompt(self.processor, item)
        return prompt


def content_key(item: Item) -> int:
    """A 63-bit hash of what the model sees: duplicates in a batch are found by equal keys."""
    digest = hashlib.blake2b(repr(item.content_key()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def local_batches(loader: StepLoader, start: int, stop: int, num_workers: int = 0):
    """Iterate this process's batches for steps ``start..stop-1`` (workers read ahead)."""
    return torch.utils.data.DataLoader(loader, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                       collate_fn=_identity, persistent_workers=False,
                                       prefetch_factor=2 if num_workers else None)


def _identity(x):
    return x
