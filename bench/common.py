"""Shared helpers for the bench scripts: a tiny backbone, a mixed item set, median timing."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np


def tiny_embedder(arch: str = "qwen3_vl", folder: str | None = None, size: str = "tiny"):
    from mmemb import Embedder
    from mmemb.data.minimmeb import tokenizer_corpus
    from mmemb.model.tiny import build_tiny_backbone

    folder = folder or tempfile.mkdtemp(prefix="mmemb-bench-")
    path = Path(folder) / (arch if size == "tiny" else f"{arch}-{size}")
    if not (path / "config.json").exists():
        build_tiny_backbone(arch, path, corpus=tokenizer_corpus(), size=size)
    return Embedder.from_pretrained(str(path))


def mixed_items(n: int = 64, seed: int = 0):
    """Half image queries of 1-4 digit cells (MiniMMEB's shapes), half short texts."""
    from PIL import Image

    from mmemb import Item

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        if i % 2 == 0:
            cells = int(rng.integers(1, 5))
            img = Image.fromarray((rng.random((16, 16 * cells, 3)) * 255).astype("uint8"))
            items.append(Item(images=[img], text="What is the sum of the digits?",
                              instruction="Represent the given image with the following question:"))
        else:
            items.append(Item(text=" ".join(str(d) for d in rng.integers(0, 10, int(rng.integers(2, 5)))),
                              instruction="Represent the given caption."))
    return items


def median_times(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run interleaved (A B C A B C ...) so drift hits all alike."""
    from mmemb.eval.timing import interleaved_times

    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, warmup).items()}
