"""MiniMMEB: the embedded benchmark, built from scikit-learn's 1,797 scanned handwritten digits.

Each 8x8 scan becomes a 16x16 cell (dark ink on white); cells are composed left to right into
images of 1-4 digits. Scans are split into train / val / test first, so no split shares a scan.
The benchmark is written in MMEB's formats (training pairs as mmemb Pair rows, evaluation rows
in the MMEB-V2 image-task format), so the same loaders, trainer and evaluator run on it as on
MMEB-V2. See :mod:`mmemb.data.minimmeb_tasks` for what each task asks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_dir, read_json, write_json, write_jsonl
from ..items import Item, Pair
from . import minimmeb_tasks as T
from .minimmeb_teacher import FORMAT_ONLY_TEXTS

CELL = 16  # pixels per digit cell: one merged vision token for patch 8 x merge 2
SPLITS = {"train": 0.6, "val": 0.1, "test": 0.3}


def tokenizer_corpus() -> list[str]:
    """Text for a tiny backbone's tokenizer: the benchmark's vocabulary plus the chat roles."""
    return T.corpus_lines() + FORMAT_ONLY_TEXTS * 10 + ["system", "user", "assistant"] * 20


@dataclass
class BuildConfig:
    seed: int = 0
    train_pairs: int = 20_000  # across all tasks
    val_queries: int = 100  # per task
    test_queries: int = 200  # per task
    hard_negatives: int = 3  # per training pair
    tasks: tuple[str, ...] = tuple(T.TASKS)


class _Scans:
    """The digit scans of one split, rendered once, indexed by class."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        self.images, self.labels, self.ids = images, labels, ids
        self.by_class = {c: [int(i) for i in ids if labels[i] == c] for c in range(10)}

    def pick(self, digit: int, rng: random.Random, avoid: set[int] = frozenset()) -> int:
        pool = [i for i in self.by_class[digit] if i not in avoid] or self.by_class[digit]
        return rng.choice(pool)


def load_digit_scans(seed: int = 0) -> dict[str, _Scans]:
    """Split the scans (stratified by class, seeded) into disjoint train / val / test sets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = 255 - (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # ink dark on white
    labels = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(len(idx) * SPLITS["train"]))
        n_val = int(round(len(idx) * SPLITS["val"]))
        parts["train"] += idx[:n_train].tolist()
        parts["val"] += idx[n_train:n_train + n_val].tolist()
        parts["test"] += idx[n_train + n_val:].tolist()
    return {s: _Scans(images, labels, np.array(sorted(ids))) for s, ids in parts.items()}


def render(scans: _Scans, scan_ids: list[int]) -> Image.Image:
    cells = [np.kron(scans.images[i], np.ones((CELL // 8, CELL // 8), np.uint8)) for i in scan_ids]
    strip = np.concatenate(cells, axis=1)
    return Image.fromarray(np.stack([strip] * 3, axis=-1))


class _Writer:
    """Writes each distinct composition once (same scans -> same file) and returns its path."""

    def __init__(self, root: Path, scans: dict[str, _Scans]):
        self.root, self.scans, self.seen = root, scans, set()

    def image(self, split: str, scan_ids: list[int]) -> str:
        rel = f"images/{split}/{'-'.join(map(str, scan_ids))}.png"
        if rel not in self.seen:
            self.seen.add(rel)
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            render(self.scans[split], scan_ids).save(path, compress_level=1)
        return rel


def _sample_query(task: str, scans: _Scans, rng: random.Random) -> tuple[list[int], list[int], int | None]:
    spec = T.TASKS[task]
    n = rng.randint(*spec.n_digits)
    digits = [rng.randrange(10) for _ in range(n)]
    ids: list[int] = []
    for d in digits:
        ids.append(scans.pick(d, rng, avoid=set(ids)))
    position = rng.randrange(n) if task == "DigitGround" else None
    return digits, ids, position


def _candidates(task: str, split: str, digits: list[int], scan_ids: list[int], position: int | None, n: int,
                writer: _Writer, rng: random.Random) -> tuple[list[str], list[str]]:
    """Texts and image paths of the candidates, positive first ("" where a side has none)."""
    spec, scans = T.TASKS[task], writer.scans[split]
    if task == "DigitCaption-T2I":
        strings = [digits] + T.digit_negatives(digits, n - 1, rng)
        paths = [writer.image(split, [scans.pick(d, rng) for d in s]) for s in strings]
        return [""] * len(paths), paths
    if task == "DigitGround":
        assert position is not None
        want = digits[position]
        classes = [want] + rng.sample([c for c in range(10) if c != want], n - 1)
        paths = [writer.image(split, [scans.pick(c, rng, avoid=set(scan_ids))]) for c in classes]
        return [""] * len(paths), paths
    assert not spec.target_is_image
    texts = [str(T.answer(task, digits, position))] + T.text_negatives(task, digits, n - 1, rng)
    return texts, [""] * len(texts)


def _query_item(task: str, split: str, digits, scan_ids, position, writer: _Writer) -> Item:
    spec = T.TASKS[task]
    images = [writer.image(split, scan_ids)] if spec.query_is_image else []
    return Item(instruction=spec.qry_inst, text=T.query_text(task, digits, position) or None, images=images)


def _meta(task: str, digits, scan_ids, position) -> dict:
    meta = {"task": task, "kind": T.TASKS[task].kind, "digits": digits, "scans": scan_ids,
            "answer": T.answer(task, digits, position)}
    if position is not None:
        meta["position"] = position
    return meta


def build(out: str | Path, config: BuildConfig | None = None, progress: bool = False) -> Path:
    """Build MiniMMEB into ``out`` (written atomically: a killed build leaves nothing half-made)."""
    cfg = config or BuildConfig()
    start = time.perf_counter()
    scans = load_digit_scans(cfg.seed)
    out = Path(out)
    counts: dict[str, dict[str, int]] = {t: {} for t in cfg.tasks}
    with atomic_dir(out) as tmp:
        writer = _Writer(tmp, scans)
        per_task = -(-cfg.train_pairs // len(cfg.tasks))
        for t_index, task in enumerate(cfg.tasks):
            spec = T.TASKS[task]
            rng = random.Random(cfg.seed * 1000 + t_index)
            pairs = []
            for k in range(per_task):
                digits, ids, pos = _sample_query(task, scans["train"], rng)
                texts, paths = _candidates(task, "train", digits, ids, pos, cfg.hard_negatives + 1, writer, rng)
                targets = [Item(instruction=spec.tgt_inst, text=tx or None, images=[p] if p else [])
                           for tx, p in zip(texts, paths)]
                pairs.append(Pair(query=_query_item(task, "train", digits, ids, pos, writer), positive=targets[0],
                                  negatives=targets[1:], dataset=task, id=f"{task}/train/{k}",
                                  meta=_meta(task, digits, ids, pos)).to_json())
            write_jsonl(tmp / "train" / f"{task}.jsonl", pairs)
            counts[task]["train"] = len(pairs)
            for split, n_queries in (("val", cfg.val_queries), ("test", cfg.test_queries)):
                rows = []
                for k in range(n_queries):
                    digits, ids, pos = _sample_query(task, scans[split], rng)
                    texts, paths = _candidates(task, split, digits, ids, pos, spec.n_candidates, writer, rng)
                    query = _query_item(task, split, digits, ids, pos, writer)
                    rows.append({
                        "qry_inst": spec.qry_inst, "qry_text": query.text or "",
                        "qry_img_path": query.images[0] if query.images else "",
                        "tgt_inst": spec.tgt_inst, "tgt_text": texts, "tgt_img_path": paths,
                        "meta": dict(_meta(task, digits, ids, pos), id=f"{task}/{split}/{k}"),
                    })
                write_jsonl(tmp / split / f"{task}.jsonl", rows)
                counts[task][split] = len(rows)
            if progress:
                print(f"  {task}: {counts[task]}", flush=True)
        write_json(tmp / "manifest.json", {
            "benchmark": "minimmeb", "version": 1, "seed": cfg.seed,
            "source": "sklearn.datasets.load_digits (1,797 scans of handwritten digits)",
            "scans": {s: len(v.ids) for s, v in scans.items()},
            "tasks": {t: {"kind": T.TASKS[t].kind, "meta_task": T.TASKS[t].meta_task, "modality": "image",
                          "metric": "hit@1", "eval_type": "local", "counts": counts[t]} for t in cfg.tasks},
            "build_seconds": round(time.perf_counter() - start, 2),
        })
    return out


def manifest(root: str | Path) -> dict:
    return read_json(Path(root) / "manifest.json")


def load_pairs(root: str | Path, tasks: list[str] | None = None, split: str = "train") -> list[Pair]:
    """Training pairs of the given tasks (image paths resolved against the benchmark folder)."""
    from ..fileio import iter_jsonl

    root = Path(root)
    tasks = tasks or list(manifest(root)["tasks"])
    return [Pair.from_json(row, root) for t in tasks for row in iter_jsonl(root / split / f"{t}.jsonl")]
