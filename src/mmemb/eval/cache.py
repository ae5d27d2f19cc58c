"""On-disk cache of candidate embeddings, keyed by model, encode settings and content.

Layout: ``ROOT/<model fingerprint>/<settings fingerprint>/shard-<id>.npy`` (vectors) with a
``shard-<id>.json`` beside it (the content digests of its rows, which rows failed and why, the
seconds it took). The JSON is written after the vectors, both atomically, so a shard exists whole
or not at all; a run killed mid-way keeps every shard it finished. Any number of runs (and the
processes of one run) may share a cache: :meth:`EmbeddingCache.refresh` picks up their shards.

Content digests hash what the model sees: instruction, text, and the *bytes* of every image and
video frame (not their paths: a rebuilt benchmark can put new images at old paths).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_save_npy, file_fingerprint, read_json, write_json
from ..items import Item

DEFAULT_CACHE = Path(os.environ.get("MMEMB_CACHE", Path.home() / ".cache" / "mmemb")) / "eval"


class EmbeddingCache:
    """Vectors of already-encoded candidates for one (model, candidate settings) pair."""

    def __init__(self, root: str | os.PathLike, model_fp: str, settings_fp: str):
        self.dir = Path(root) / model_fp / settings_fp
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[str, int]] = {}
        self._errors: dict[str, str] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._seconds: dict[str, float] = {}  # per registered shard
        self.refresh()

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Keys not in the cache, distinct, in first-seen order."""
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self._index and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def get(self, keys: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """(vectors (n, dim), ok (n,), {key: error}) for cached keys; failed rows are zeros."""
        vecs = np.zeros((len(keys), dim), np.float32)
        ok = np.zeros(len(keys), bool)
        errors = {}
        for i, k in enumerate(keys):
            shard, row = self._index[k]
            if k in self._errors:
                errors[k] = self._errors[k]
                continue
            vecs[i] = self._array(shard)[row]
            ok[i] = True
        return vecs, ok, errors

    def add(self, keys: Sequence[str], vectors: np.ndarray, ok: np.ndarray, errors: dict[int, str],
            seconds: float = 0.0) -> None:
        """Store one encoded chunk as a new shard."""
        shard = _shard_name(keys)
        meta = {"keys": list(keys), "failed": {str(i): reason for i, reason in errors.items()}, "seconds": seconds}
        atomic_save_npy(self.dir / f"{shard}.npy", np.asarray(vectors, np.float32))
        write_json(self.dir / f"{shard}.json", meta)
        self._register(shard, meta)

    def has_shard(self, keys: Sequence[str]) -> bool:
        """Whether the chunk ``keys`` is stored (by any process)."""
        return (self.dir / f"{_shard_name(keys)}.json").exists()

    def shard_seconds(self, keys: Sequence[str]) -> float:
        """Encoding seconds of the registered chunk ``keys``."""
        return self._seconds.get(_shard_name(keys), 0.0)

    def refresh(self) -> None:
        """Register the shards written since (by other runs or processes)."""
        for meta_path in sorted(self.dir.glob("shard-*.json")):
            if meta_path.stem not in self._seconds:
                self._register(meta_path.stem, read_json(meta_path))

    def _register(self, shard: str, meta: dict) -> None:
        self._seconds[shard] = float(meta.get("seconds", 0.0))
        failed = {int(i): reason for i, reason in meta.get("failed", {}).items()}
        for row, key in enumerate(meta["keys"]):
            self._index[key] = (shard, row)
            if row in failed:
                self._errors[key] = failed[row]
            else:
                self._errors.pop(key, None)

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.dir / f"{shard}.npy", mmap_mode="r")
        return self._arrays[shard]


def _shard_name(keys: Sequence[str]) -> str:
    return "shard-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]


# ---- fingerprints ------------------------------------------------------------------------------
def item_digest(item: Item) -> str:
    """A stable hash of everything of an item the model sees."""
    parts = [item.instruction or "", item.text or "", item.rationale or "",
             [_image_digest(i) for i in item.images], None if item.video is None else [_image_digest(f) for f in item.video]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _image_digest(src: Any) -> str:
    from PIL import Image

    if isinstance(src, Image.Image):
        return "pil:" + hashlib.sha256(f"{src.mode}{src.size}".encode() + src.tobytes()).hexdigest()[:32]
    if isinstance(src, bytes):
        return "bytes:" + hashlib.sha256(src).hexdigest()[:32]
    path = os.fspath(src)
    if path.startswith("data:"):
        return "url:" + hashlib.sha256(path.encode()).hexdigest()[:32]
    try:
        st = os.stat(path)
    except OSError:
        return "missing:" + path  # fails when encoded; a file that appears later gets a new key
    return _file_digest(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Hash of a file's bytes; size and mtime are part of the memo key (a changed file is re-read)."""
    return "file:" + file_fingerprint(path, 32)


def model_fingerprint(embedder: Any) -> str:
    """A hash of the weights, config, tokenizer and image-processor settings of the backbone."""
    bb = embedder.backbone
    h = hashlib.sha256()
    h.update(bb.config.to_json_string(use_diff=False).encode())
    tok = bb.tokenizer
    h.update(f"{len(tok)}|{getattr(tok, 'chat_template', '')}".encode())
    for attr in ("image_processor", "video_processor"):
        proc = getattr(bb.processor, attr, None)
        if proc is not None:
            h.update(repr(sorted(dict(proc.size).items())).encode())
    h.update(str(getattr(embedder, "max_image_pixels", "")).encode())
    protocol = getattr(embedder, "protocol", None)
    if protocol is not None and protocol.name != "mmemb":  # a peer's convention gives other vectors
        h.update(protocol.name.encode())
    _hash_module(h, bb)
    return h.hexdigest()[:20]


def gate_fingerprint(gate: Any) -> str | None:
    """A plug-in gate's weights (or, for a gate that is not a torch module, its type)."""
    if gate is None:
        return None
    h = hashlib.sha256()
    if hasattr(gate, "state_dict"):
        _hash_module(h, gate)
    else:
        h.update(f"{type(gate).__module__}.{type(gate).__qualname__}".encode())
    return h.hexdigest()[:20]


def _hash_module(h: "hashlib._Hash", module: Any) -> None:
    import torch

    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
