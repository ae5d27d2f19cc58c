"""Small Pair-JSONL datasets in MiniMMEB's layout (DIR/manifest.json, DIR/images, DIR/train/TASK.jsonl).

Images are real scanned digits (scikit-learn's bundled set), 2x upscaled; pairs mirror MiniMMEB's
DigitClass (image -> class word) and DigitSum (image of 3 digits + question -> the sum, with a
rationale and a reason/direct label).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digit_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0 * 255).astype("uint8"), d.target


def _strip(images, labels, idx):
    from PIL import Image

    cells = [np.kron(images[i], np.ones((2, 2), dtype="uint8")) for i in idx]
    arr = np.concatenate(cells, axis=1)
    return Image.fromarray(np.stack([arr] * 3, -1)), [int(labels[i]) for i in idx]


def write_pairs(root: str | Path, n_class: int = 48, n_sum: int = 16, negatives: int = 2, seed: int = 0,
                rationale_share: float = 1.0) -> dict[str, Path]:
    """Write DIR/train/DigitClass.jsonl and DIR/train/DigitSum.jsonl; return their paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"benchmark": "trainer-test-pairs"}))  # image paths: from root
    images, labels = _digit_images()
    rng = random.Random(seed)
    out = {}
    rows = []
    for i in range(n_class):
        k = rng.randrange(len(labels))
        img, (digit,) = _strip(images, labels, [k])
        rel = f"images/class_{seed}_{i}.png"
        img.save(root / rel)
        negs = rng.sample([w for w in WORDS if w != WORDS[digit]], negatives)
        rows.append({"id": f"class-{i}", "dataset": "DigitClass",
                     "query": {"instruction": "Represent the given image for classification.", "images": [rel]},
                     "positive": {"instruction": "Represent the class label.", "text": WORDS[digit]},
                     "negatives": [{"instruction": "Represent the class label.", "text": w} for w in negs],
                     "label": "direct" if i % 3 == 0 else None})
    out["DigitClass"] = _write(root / "train" / "DigitClass.jsonl", rows)
    rows = []
    for i in range(n_sum):
        idx = [rng.randrange(len(labels)) for _ in range(3)]
        img, digits = _strip(images, labels, idx)
        rel = f"images/sum_{seed}_{i}.png"
        img.save(root / rel)
        total = sum(digits)
        rationale = f"digits {' '.join(map(str, digits))}. {digits[0]}+{digits[1]}={digits[0] + digits[1]}. " \
                    f"{digits[0] + digits[1]}+{digits[2]}={total}."
        query = {"instruction": "Represent the given image with the following question:",
                 "text": "What is the sum of the digits?", "images": [rel]}
        if rng.random() < rationale_share:
            query["rationale"] = rationale
        rows.append({"id": f"sum-{i}", "dataset": "DigitSum", "query": query,
                     "positive": {"instruction": "Represent the given text answer.", "text": str(total)},
                     "negatives": [{"instruction": "Represent the given text answer.", "text": str(total + d)}
                                   for d in (1, -1, 2)[:negatives]],
                     "label": "reason" if i % 2 == 0 else "direct"})
    out["DigitSum"] = _write(root / "train" / "DigitSum.jsonl", rows)
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return path


def write_mixed(root: str | Path, n_class: int = 4, n_sum: int = 3, corrupt: int = 1, seed: int = 0) -> Path:
    """One JSONL of DigitClass and DigitSum pairs (with rationales and labels), plus ``corrupt`` pairs
    whose image file is not an image; returns its path."""
    root = Path(root)
    paths = write_pairs(root, n_class=n_class, n_sum=n_sum, seed=seed)
    rows = [json.loads(line) for p in paths.values() for line in p.read_text().splitlines()]
    for k in range(corrupt):
        (root / "images" / f"corrupt_{k}.png").write_bytes(b"not a png at all")
        bad = json.loads(json.dumps(rows[0]))
        bad["id"], bad["query"]["images"] = f"corrupt-{k}", [f"images/corrupt_{k}.png"]
        rows.insert(2 + k, bad)
    return _write(root / "train" / "mixed.jsonl", rows)
