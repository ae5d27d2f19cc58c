"""MMEB-V3's tasks beyond MMEB-V2, read from an MMEB-V3 download (``--data DIR``) as its own
evaluation code reads them (VLM2Vec's MMEB-V3 branch, ``src/data/eval_dataset/``).

Loaded here: the 53 text-retrieval tasks (``complex_text_retrieve``: BRIGHT, FollowIR,
InfoSearch, LongEmbed, MultiConIR, NanoBEIR, R2MED), each query ranking the task's whole corpus.
Not loaded: the agent tasks (``toolde``, ``gui``, ``memory_retrieval``) and MCMR, whose parsers
are not ported yet, and the audio tasks, which Qwen-VL backbones cannot take (no audio encoder).
Those fail with :class:`TaskNotSupported`, naming the parser, and ``mmemb eval`` goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..items import Item, RankingTask
from .mmeb import TaskInfo
from .mmeb_hub import DataNotFound, read_table


class TaskNotSupported(DataNotFound):
    """A registered task mmemb cannot load (yet, or with these backbones); the message says which."""


UNSUPPORTED = {
    "audio_cls": "audio input: Qwen-VL backbones have no audio encoder",
    "toolde": "MMEB-V3's ToolDe parser (src/data/eval_dataset/toolde_dataset.py) is not ported to mmemb yet",
    "gui": "MMEB-V3's GUI parser (src/data/eval_dataset/gui_dataset.py) is not ported to mmemb yet",
    "memory_retrieval": "MMEB-V3's memory parser (src/data/eval_dataset/memory_retrieval_dateset.py) is not ported "
                        "to mmemb yet",
    "mcmr": "MMEB-V3's MCMR parser (src/data/eval_dataset/mcmr_dataset.py) is not ported to mmemb yet",
}


def load_v3_task(info: TaskInfo, data) -> RankingTask:
    parser = info.extra["parser"]
    if parser != "complex_text_retrieve":
        reason = UNSUPPORTED.get(parser, f"no loader for MMEB-V3's {parser!r} parser")
        if info.modality == "audio":
            reason = UNSUPPORTED["audio_cls"]
        raise TaskNotSupported(f"{info.name}: {reason}")
    if data is None:
        raise DataNotFound(f"{info.name}: MMEB-V3 text tasks are read from a local MMEB-V3 download: pass --data DIR")
    return text_task(info, Path(data))


# ---- text retrieval --------------------------------------------------------------------------
def text_task(info: TaskInfo, data: Path) -> RankingTask:
    files = info.extra["files"]
    paths = {k: data / files[k] for k in ("query_file", "candidate_file", "qrels_file") if files.get(k)}
    for key, path in paths.items():
        if not path.is_file():
            raise DataNotFound(f"{info.name}: {path} does not exist (the task's {key.replace('_', ' ')}); "
                               f"download MMEB-V3 into {data} and unpack its text-tasks")
    qrels_path = paths.get("qrels_file")
    qrels = _qrels(read_table(qrels_path)) if qrels_path else None
    variant = next((v for v in ("changed", "reversed", "og") if qrels_path and f"qrels_{v}" in str(qrels_path)), None)
    candidates = []
    for row in read_table(paths["candidate_file"]):
        cid = _first(row, "_id", "id", "doc_id", "document_id", "corpus-id")
        title, text = row.get("title") or "", row.get("text") or row.get("content") or ""
        text = f"{title}\n{text}" if title and text else text
        if cid is not None and text:
            candidates.append(Item(text=text, id=str(cid)))
    known = {c.id for c in candidates}
    queries, relevance = [], {}
    for row in read_table(paths["query_file"]):
        qid = _first(row, "_id", "id", "qid", "query_id", "query-id")
        text = _query_text(row, variant, files.get("subset_name", ""))
        if qid is None or not text:
            continue
        qid = str(qid)
        gold = qrels.get(qid, {}) if qrels is not None else {str(g): 1.0 for g in _gold_ids(row)}
        queries.append(Item(text=text, instruction=info.qry_inst or None, id=qid))
        relevance[qid] = {c: r for c, r in gold.items() if c in known}  # a query without positives scores 0
    if queries and not any(relevance.values()):
        raise DataNotFound(f"{info.name}: no query has a relevant document in {paths['candidate_file']} "
                           f"(check the qrels file and the id columns)")
    meta = {"benchmark": info.benchmark, "modality": info.modality, "meta_task": info.meta_task,
            "candidate_refs": len(candidates)}
    return RankingTask(info.name, queries, candidates, relevance, "global", info.metric, None, meta)


def _first(row: dict, *keys: str):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _qrels(rows) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        qid = _first(row, "query_id", "query-id", "qid", "q_id", "id")
        did = _first(row, "corpus_id", "corpus-id", "doc_id", "document_id", "p_id")
        try:
            score = float(row.get("label", row.get("score", 1)))
        except (TypeError, ValueError):
            score = 1.0
        if qid is not None and did is not None and score > 0:
            out.setdefault(str(qid), {})[str(did)] = score
    return out


def _query_text(row: dict, variant: str | None, subset: str) -> str:
    """The query as MMEB-V3 builds it: InfoSearch and FollowIR queries carry their instruction."""
    base = row.get("text") or row.get("query") or row.get("query_content") or row.get("short_query") or ""
    subset = subset.lower()
    for family, field in (("infosearch", "instruction_changed"), ("followir", "instruction_og")):
        if family in subset:
            return f"{row.get(field) or ''} {base}".strip()
    if variant and row.get(f"instruction_{variant}"):
        return row[f"instruction_{variant}"]
    return base


def _gold_ids(row: dict) -> list:
    gold = row.get("gold_ids") or row.get("gold_ids_long") or []
    if isinstance(gold, str):
        try:
            gold = json.loads(gold)
        except json.JSONDecodeError:
            gold = []
    return [g for g in gold if g is not None]
