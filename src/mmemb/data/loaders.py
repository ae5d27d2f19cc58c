"""Loaders: benchmark data on disk (or on the Hugging Face hub) -> :class:`RankingTask`.

MMEB-V2 is read as the hub distributes it (:mod:`mmemb.data.mmeb_hub`: a TIGER-Lab/MMEB-V2
download with the annotation datasets beside it, parsed as VLM2Vec-V2 parses them). Three
formats meet here (``docs/eval.md`` has the folder layouts):

* **rows** — MMEB eval rows ``qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text[], tgt_img_path[]``,
  the positive first (or graded by ``tgt_rel``); ``qry_video`` / ``tgt_video[]`` are frame folders,
  each giving :data:`NUM_FRAMES` frames. Local tasks rank each row's own list; global tasks rank
  the union of all rows' candidates (and a corpus, e.g. the full label set). The image tasks'
  rows are distributed in this format; the video tasks' annotations are turned into it.
  The project's own earlier layout (rows in ``image-tasks/<TASK>/``, ``video-tasks/<TASK>/test.jsonl``)
  is still read.
* **beir** — visual documents: ``queries``, ``corpus`` (page images), ``qrels`` (graded relevance);
  every query ranks the whole corpus.
* MiniMMEB — rows in ``DIR/<split>/<TASK>.jsonl`` with images relative to ``DIR``.

Images are not opened here: a missing or corrupt one fails its own item when it is encoded.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..fileio import iter_jsonl
from ..hub import hub_offline
from ..items import Item, RankingTask
from .mmeb import IMAGE, VIDEO, VISDOC, TaskInfo
from .mmeb_hub import MVBENCH_SUBSETS, VIDEO_PARSERS, DataNotFound, hub_rows, media_root, missing_repo, visdoc_image
from .mmeb_v3 import load_v3_task

NUM_FRAMES = 8
IMAGE_PLACEHOLDER = "<|image_1|>"
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---- entry point --------------------------------------------------------------------------------
def load_task(info: TaskInfo, data: str | os.PathLike | None = None, split: str = "test",
              num_frames: int = NUM_FRAMES) -> RankingTask:
    """Load one task from a local copy (``data``) or, where the hub is reachable, by hub name."""
    if info.benchmark == "minimmeb":
        if data is None:
            raise DataNotFound(f"{info.name}: MiniMMEB tasks need --data DIR (a `mmemb minimmeb build` folder)")
        path = Path(data) / split / f"{info.name}.jsonl"
        if not path.is_file():
            raise DataNotFound(f"{info.name}: no {split} rows at {path}")
        return rows_task(info, iter_jsonl(path), root=Path(data), num_frames=num_frames)
    if "files" in info.extra:  # an MMEB-V3 task beyond MMEB-V2
        return load_v3_task(info, data)
    if info.modality == IMAGE:
        return _load_image_task(info, data, num_frames)
    if info.modality == VIDEO:
        return _load_video_task(info, data, num_frames)
    if info.modality == VISDOC:
        return _load_visdoc_task(info, data)
    raise ValueError(f"{info.name}: unknown modality {info.modality!r}")


def _load_image_task(info: TaskInfo, data, num_frames: int) -> RankingTask:
    if data is None:
        raise DataNotFound(
            f"{info.name}: image tasks need a local copy of the MMEB-V2 images: download TIGER-Lab/MMEB-V2 into DIR "
            f"(`hf download TIGER-Lab/MMEB-V2 --repo-type dataset --local-dir DIR`), unpack "
            f"DIR/image-tasks/mmeb_v1.tar.gz, and pass --data DIR")
    base = Path(data) / "image-tasks"
    rows = _read_rows(base, info.name) if base.is_dir() else None  # the project's own layout
    if rows is None:
        rows = _annotations(info, data)
    return rows_task(info, rows, root=_image_root(info, data), num_frames=num_frames)


def _image_root(info: TaskInfo, data) -> Path:
    """image-tasks/ as VLM2Vec's download script leaves it (MMEB/* moved up), or image-tasks/MMEB/."""
    base = media_root(info.name, data, "image-tasks")
    if (base / "MMEB").is_dir():
        return base / "MMEB"
    if not any(p.is_dir() for p in base.iterdir()):
        media_root(info.name, data, "image-tasks/MMEB")  # raises, naming the archive to unpack
    return base


def _load_video_task(info: TaskInfo, data, num_frames: int) -> RankingTask:
    if data is None:
        raise DataNotFound(f"{info.name}: video tasks are read from a local copy with the extracted frames "
                           f"(TIGER-Lab/MMEB-V2's video-tasks/frames/): pass --data DIR")
    own = Path(data) / "video-tasks" / info.name
    if own.is_dir():  # the project's own layout: rows with frame folders relative to DIR/video-tasks
        rows = _read_rows(own.parent, info.name)
        if rows is None:
            raise DataNotFound(f"{info.name}: {own} holds no test rows (test.jsonl or test-*.parquet)")
        return rows_task(info, rows, root=own.parent, num_frames=num_frames,
                         corpus=_read_table(own, "corpus"))
    annotations = _annotations(info, data)
    root = media_root(info.name, data, info.extra["media"])
    rows, corpus = VIDEO_PARSERS[info.extra["parser"]](info, annotations, root)
    return rows_task(info, rows, root=root, num_frames=num_frames, corpus=corpus)


def _load_visdoc_task(info: TaskInfo, data) -> RankingTask:
    folder = None if data is None else Path(data) / "visdoc-tasks" / info.name
    if folder is not None and folder.is_dir():  # the project's own layout: the three tables in the task folder
        parts = {name: _read_table(folder, name) for name in ("queries", "corpus", "qrels")}
        missing = [name for name, rows in parts.items() if rows is None]
        if len(missing) < 3:
            if missing:
                raise DataNotFound(f"{info.name}: {folder} has no {', '.join(missing)} "
                                   f"(expected queries / corpus / qrels as .jsonl, .parquet or a folder of them)")
            return beir_task(info, parts["queries"], parts["corpus"], parts["qrels"], root=folder)
    queries, corpus, qrels = (_annotations(info, data, config=c) for c in ("queries", "corpus", "qrels"))
    pages = Path(data) / info.extra["media"] if data is not None else None
    if pages is not None and pages.is_dir():  # page images as VLM2Vec-V2 saved them, where unpacked
        corpus = [_page_from_folder(row, info, pages) for row in corpus]
    return beir_task(info, queries, corpus, qrels, root=pages or Path("."))


def _page_from_folder(row: dict, info: TaskInfo, pages: Path) -> dict:
    path = visdoc_image(info.extra["parser"], pages, str(row["corpus-id"]))
    return {**row, "image": str(path)} if path.is_file() else row


def _annotations(info: TaskInfo, data, config: str | None = None) -> list[dict]:
    """A task's annotation rows: from the local download of its dataset, else from the hub."""
    repo, default_config, split = info.hub
    configs = MVBENCH_SUBSETS if info.extra.get("parser") == "mvbench" else [config or default_config]
    rows = []
    for cfg in configs:
        part = hub_rows(info.name, data, repo, cfg, split)
        if part is None:
            part = _hub_split(info, data, repo, cfg, split)
        rows += [{**r, "subset": cfg} for r in part] if len(configs) > 1 else list(part)
    return rows


# ---- rows format -------------------------------------------------------------------------------
def rows_task(info: TaskInfo, rows: Iterable[dict], root: Path, num_frames: int = NUM_FRAMES,
              corpus: Iterable[dict] | None = None) -> RankingTask:
    """A task from MMEB eval rows (positive first). Global tasks rank the union of all candidates."""
    queries: list[Item] = []
    lists: dict[str, list[Item]] = {}
    rels: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        qid = str(row.get("id") or (row.get("meta") or {}).get("id") or i)
        try:
            query = _row_item(row, "qry", info.qry_inst, root, num_frames)
            texts = list(row.get("tgt_text") or [])
            n = max(len(texts), len(row.get("tgt_img_path") or []), len(row.get("tgt_video") or []))
            if n == 0:
                raise ValueError("no candidates")
            cands = [_row_item(row, "tgt", info.tgt_inst, root, num_frames, j) for j in range(n)]
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{info.name}: row {i}: {e}") from None
        if qid in lists:
            raise ValueError(f"{info.name}: row {i}: duplicate query id {qid!r}")
        query.id, query.meta = qid, {**query.meta, **(row.get("meta") or {})}
        queries.append(query)
        lists[qid] = cands
        rel = row.get("tgt_rel") or [1.0] + [0.0] * (n - 1)  # positive first unless the row grades them
        if len(rel) != n:
            raise ValueError(f"{info.name}: row {i}: tgt_rel has {len(rel)} values for {n} candidates")
        rels[qid] = [float(r) for r in rel]

    # One pool of distinct candidates (identical content is one candidate, encoded once);
    # local tasks keep each row's own list of pool ids, global tasks rank the whole pool.
    pool: dict[tuple, Item] = {}

    def intern(item: Item) -> str:
        key = item.content_key()
        if key not in pool:
            item.id = f"c{len(pool)}"
            pool[key] = item
        return pool[key].id

    for row in corpus or []:
        intern(_corpus_item(row, info.tgt_inst, root, num_frames))
    cand_lists: dict[str, list[str]] = {}
    relevance: dict[str, dict[str, float]] = {}
    refs = 0
    for qid, cands in lists.items():
        ids = [intern(item) for item in cands]
        refs += len(ids)
        cand_lists[qid] = list(dict.fromkeys(ids))
        relevance[qid] = {}
        for cid, r in zip(ids, rels[qid]):
            if r > 0:
                relevance[qid][cid] = max(r, relevance[qid].get(cid, 0.0))
    meta = _task_meta(info)
    local = info.eval_type == "local"
    meta["candidate_refs"] = refs if local else len(pool)
    return RankingTask(info.name, queries, list(pool.values()), relevance, info.eval_type, info.metric,
                       cand_lists if local else None, meta)


def _row_item(row: dict, side: str, default_inst: str, root: Path, num_frames: int, j: int | None = None) -> Item:
    """The query (``j=None``) or the j-th target of a row."""
    def field(name: str):
        value = row.get(f"{side}_{name}")
        if j is None or value is None or isinstance(value, str):
            return value
        return value[j] if j < len(value) else None

    inst = row.get(f"{side}_inst")
    text = field("text")
    inst, text = strip_placeholder(inst), strip_placeholder(text)
    if inst is None and text and default_inst and text.startswith(default_inst):
        # v1 rows put the instruction at the start of the text
        inst, text = default_inst, text[len(default_inst):].strip()
    image, video = field("img_path"), field("video")
    item = Item(text=text or None, instruction=(inst if inst is not None else default_inst) or None,
                images=[_resolve(image, root)] if image else [])
    return _with_video(item, video, root, num_frames)


def _corpus_item(row: dict, default_inst: str, root: Path, num_frames: int) -> Item:
    image, video = row.get("image"), row.get("video")
    item = Item(text=strip_placeholder(row.get("text")) or None,
                instruction=row.get("instruction", default_inst or None), images=[_resolve(image, root)] if image else [])
    return _with_video(item, video, root, num_frames)


def _with_video(item: Item, video: str | None, root: Path, num_frames: int) -> Item:
    """The item with ``num_frames`` frames sampled from the video folder, where it has one."""
    if video:
        folder = _resolve(video, root)
        item.video = sample_frames(folder, num_frames)
        item.meta["video"] = str(folder)
    return item


def strip_placeholder(s: Any) -> str | None:
    """Drop the phi-3-v image placeholder MMEB rows carry; trim the whitespace around it."""
    if s is None:
        return None
    return str(s).replace(IMAGE_PLACEHOLDER, "").strip()


# ---- BEIR format -------------------------------------------------------------------------------
def beir_task(info: TaskInfo, queries: Iterable[dict], corpus: Iterable[dict], qrels: Iterable[dict],
              root: Path) -> RankingTask:
    """Visual-document retrieval: every query ranks the whole page corpus; graded relevance."""
    candidates = []
    for row in corpus:
        cid = str(_first(row, "corpus-id", "_id", "id"))
        image = _first(row, "image", "image_path", default=None)
        if isinstance(image, dict):  # parquet / datasets image struct
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            image = _resolve(image, root)
        candidates.append(Item(images=[image] if image else [], instruction=info.tgt_inst or None, id=cid))
    relevance: dict[str, dict[str, float]] = {}
    for row in qrels:
        score = float(row.get("score", 1))
        if score > 0:
            relevance.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = score
    known = {c.id for c in candidates}
    items, dropped = [], 0
    for row in queries:
        qid = str(_first(row, "query-id", "_id", "id"))
        rel = {c: r for c, r in relevance.get(qid, {}).items() if c in known}
        if not rel:  # nothing to find: not scorable (BEIR / pytrec_eval leave these out too)
            dropped += 1
            continue
        relevance[qid] = rel
        items.append(Item(text=str(_first(row, "query", "text")), instruction=info.qry_inst or None, id=qid))
    meta = _task_meta(info)
    meta["dropped_queries"] = dropped
    meta["candidate_refs"] = len(candidates)
    relevance = {q.id: relevance[q.id] for q in items}
    return RankingTask(info.name, items, candidates, relevance, "global", info.metric, None, meta)


def _first(row: dict, *keys: str, default: Any = KeyError):
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    if default is KeyError:
        raise KeyError(f"row has none of {keys}")
    return default


# ---- video frames ------------------------------------------------------------------------------
def sample_frames(folder: str | os.PathLike, num_frames: int = NUM_FRAMES) -> list[str]:
    """``num_frames`` frame paths spread uniformly over a folder of frames, as VLM2Vec-V2 samples them.

    Frames in natural file-name order (case-insensitive); index k of n frames is
    floor(k * (n - 1) / (num_frames - 1)); a video with fewer frames gives all of them. A
    missing or empty folder gives ``[]`` (the item fails, naming the folder, when it is encoded).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS), key=_natural_key)
    if len(frames) <= num_frames:
        return [str(f) for f in frames]
    idx = np.linspace(0, len(frames) - 1, num_frames).astype(int)
    return [str(frames[i]) for i in idx]


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


# ---- reading tables ----------------------------------------------------------------------------
def _read_rows(base: Path, name: str) -> list[dict] | None:
    """A task's eval rows: ``base/<name>/test*`` files (the hub's layout) or ``base/<name>.jsonl``."""
    return _read_table(base / name, "test") if (base / name).is_dir() else _read_table(base, name)


def _read_table(folder: Path, name: str) -> list[dict] | None:
    """``folder/name.{jsonl,parquet,tsv}``, ``folder/name-*.*`` shards, or every such file in
    ``folder/name/``; None if there is none."""
    suffixes = (".jsonl", ".parquet", ".tsv")
    for suffix in suffixes:
        if (folder / f"{name}{suffix}").is_file():
            return _read_file(folder / f"{name}{suffix}")
    files = sorted(p for p in folder.glob(f"{name}-*") if p.suffix in suffixes)
    if (folder / name).is_dir():
        files += sorted(p for p in (folder / name).iterdir() if p.suffix in suffixes)
    return [row for f in files for row in _read_file(f)] if files else None


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    if path.suffix == ".tsv":  # BEIR qrels: query-id  corpus-id  score
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _resolve(path: Any, root: Path) -> Any:
    if not isinstance(path, str):
        return path
    p = Path(path)
    return str(p if p.is_absolute() else root / p)


def _task_meta(info: TaskInfo) -> dict[str, Any]:
    meta = {"benchmark": info.benchmark, "modality": info.modality, "meta_task": info.meta_task}
    if info.kind:
        meta["kind"] = info.kind
    return meta


# ---- the hub -----------------------------------------------------------------------------------
def _hub_split(info: TaskInfo, data, repo: str, config: str | None, split: str):
    """Rows from the hub, or a fast, clear failure when it cannot be reached."""
    if hub_offline():
        raise missing_repo(info.name, data, repo, config)
    from datasets import load_dataset

    return load_dataset(repo, config, split=split)
