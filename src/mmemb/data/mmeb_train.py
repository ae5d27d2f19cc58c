"""MMEB-train (VLM2Vec's training set) to mmemb's Pair JSONL, for full-scale training.

MMEB-train rows: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ``neg_text``,
``neg_image_path``; one folder per dataset (``<dataset>/<split>-*.parquet``), images unpacked
under one image root. The task instruction is part of the text ("<|image_1|> Represent the given
image with the following question: What is ..."); it is split off into ``Item.instruction`` the
way evaluation rows carry it, so training and evaluation render prompts alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..fileio import write_jsonl
from ..items import Item, Pair
from .loaders import strip_placeholder


def split_instruction(text: str | None) -> tuple[str | None, str | None]:
    """(instruction, rest): the instruction runs to the first ': ' (or is the whole text)."""
    if not text:
        return None, None
    text = strip_placeholder(text)
    head, sep, rest = text.partition(": ")
    if sep:
        return head + ":", rest.strip() or None
    return text or None, None


def _item(text: Any, image: Any, image_root: Path) -> Item:
    instruction, rest = split_instruction(text if isinstance(text, str) else None)
    images = [str(image_root / image)] if isinstance(image, str) and image else []
    return Item(instruction=instruction, text=rest, images=images)


def rows_to_pairs(rows: list[dict], dataset: str, image_root: Path) -> Iterator[Pair]:
    for n, row in enumerate(rows):
        query = _item(row.get("qry"), row.get("qry_image_path"), image_root)
        positive = _item(row.get("pos_text"), row.get("pos_image_path"), image_root)
        negatives = []
        if row.get("neg_text") or row.get("neg_image_path"):
            negatives.append(_item(row.get("neg_text"), row.get("neg_image_path"), image_root))
        if not (query.text or query.images) or not (positive.text or positive.images):
            continue  # an empty side cannot be embedded
        yield Pair(query=query, positive=positive, negatives=negatives, dataset=dataset, id=f"{dataset}/{n}")


def convert_mmeb_train(input_dir: str | Path, image_root: str | Path, out_dir: str | Path,
                       datasets: list[str] | None = None, split: str = "original") -> dict[str, int]:
    """Write ``out_dir/<dataset>.jsonl`` for each dataset folder; returns pairs per dataset."""
    import pandas as pd

    input_dir, image_root, out_dir = Path(input_dir), Path(image_root).resolve(), Path(out_dir)
    folders = sorted(p for p in input_dir.iterdir() if p.is_dir() and (not datasets or p.name in datasets))
    counts = {}
    for folder in folders:
        files = sorted(folder.glob(f"{split}*.parquet")) or sorted(folder.glob("*.parquet"))
        if not files:
            continue
        rows = pd.concat([pd.read_parquet(f) for f in files]).to_dict("records")
        pairs = [p.to_json() for p in rows_to_pairs(rows, folder.name, image_root)]
        write_jsonl(out_dir / f"{folder.name}.jsonl", pairs)
        counts[folder.name] = len(pairs)
    if not counts:
        raise FileNotFoundError(f"no <dataset>/*.parquet folders under {input_dir}")
    return counts
