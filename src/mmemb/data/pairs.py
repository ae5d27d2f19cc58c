"""Reading training pairs: a Pair-JSONL file, a glob of them, or a benchmark folder.

Image paths in a pair file are relative to the benchmark folder that holds it (the nearest
ancestor with a ``manifest.json``, as MiniMMEB writes it), else to the file's own folder.
"""

from __future__ import annotations

import glob
from pathlib import Path

from ..fileio import iter_jsonl
from ..items import Pair


def pair_root(path: str | Path) -> Path:
    path = Path(path).resolve()
    for folder in [path.parent, *path.parent.parents]:
        if (folder / "manifest.json").is_file():
            return folder
    return path.parent


def pair_files(spec: str | Path, split: str = "train") -> list[Path]:
    """The files a spec names: a folder with a manifest (its ``split`` files), a file, or a glob."""
    p = Path(spec)
    if p.is_dir():
        files = sorted((p / split).glob("*.jsonl")) if (p / split).is_dir() else sorted(p.glob("*.jsonl"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(spec)))
    if not files:
        raise FileNotFoundError(f"no pair files at {spec!r}")
    return files


def read_pairs(spec: str | Path, split: str = "train") -> list[Pair]:
    """All pairs of a spec; a bad row is named by file and line."""
    pairs = []
    for f in pair_files(spec, split):
        root = pair_root(f)
        for n, row in enumerate(iter_jsonl(f), 1):
            try:
                pair = Pair.from_json(row, root)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{f}:{n}: {e}") from None
            pair.id = pair.id or f"{f.stem}/{n}"
            pairs.append(pair)
    return pairs
