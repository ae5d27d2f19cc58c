"""Small benchmark folders written by the eval tests, in each on-disk format the loaders read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (16, 16)) -> str:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_minimmeb(root: Path, n_queries: int = 6, n_cands: int = 4) -> Path:
    """A MiniMMEB-layout folder with two tasks that share candidate texts.

    ``MiniClass``: image -> word (the words repeat across queries); ``MiniCaption``: image + question
    -> word, from the same word list with the same target instruction, so both tasks reference
    the same candidates. Returns ``root``.
    """
    root = Path(root)
    tasks = {
        "MiniClass": {"kind": "easy", "meta_task": "classification", "modality": "image", "metric": "hit@1",
                      "eval_type": "local", "counts": {"test": n_queries}},
        "MiniCaption": {"kind": "compositional", "meta_task": "vqa", "modality": "image", "metric": "hit@1",
                        "eval_type": "local", "counts": {"test": n_queries}},
    }
    (root).mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"benchmark": "minimmeb", "seed": 0, "tasks": tasks}))
    for t, task in enumerate(tasks):
        rows = []
        for i in range(n_queries):
            img = write_image(root / "images" / task / f"{i:03d}.png", seed=100 * t + i)
            words = [WORDS[(i + j) % len(WORDS)] for j in range(n_cands)]
            rows.append({"qry_inst": "<|image_1|> Represent the given image for classification.",
                         "qry_text": "" if task == "MiniClass" else "Which word?",
                         "qry_img_path": str(Path(img).relative_to(root)),
                         "tgt_inst": "Represent the class label.", "tgt_text": words, "tgt_img_path": [""] * n_cands,
                         "meta": {"digits": [i]}})
        write_jsonl(root / "test" / f"{task}.jsonl", rows)
    return root
