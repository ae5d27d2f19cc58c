"""MMEB-V2 as the hub distributes it, read with the conventions of VLM2Vec-V2's own evaluation.

A local copy (``--data DIR``) is the download of ``TIGER-Lab/MMEB-V2`` (the media) with the
annotation datasets its tasks read beside it, each in a folder named by its repository id (or
in the Hugging Face cache, where ``hf download`` puts them without ``--local-dir``):

    DIR/image-tasks/<Dataset>/...            images (image-tasks/mmeb_v1.tar.gz, extracted)
    DIR/video-tasks/frames/video_cls/...     frames (video-tasks/frames/*.tar.gz, extracted)
    DIR/visdoc-tasks/<Task>/...              page images (optional: the corpus parquet holds them)
    DIR/ziyjiang/MMEB_Test_Instruct/         image tasks' rows, one config per task
    DIR/VLM2Vec/<Task>/, DIR/lmms-lab/...    video tasks' annotations
    DIR/vidore/..., DIR/openbmb/...          visual documents: corpus / queries / qrels configs

Each task's parser turns its annotation rows into MMEB rows (query, candidates, the positive
marked) exactly as VLM2Vec-V2's ``src/data/eval_dataset`` modules build them: the same columns,
frame folders, candidate lists and label sets. Images and frames are opened only when encoded,
so one missing file fails one item (named by its path) and the task goes on; a missing
annotation dataset or media folder fails the task with the file it looked for.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from ..fileio import iter_jsonl, read_json
from .mmeb import TaskInfo

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")
VIDEO_LABELS = Path(__file__).with_name("mmeb_video_labels.json")  # VLM2Vec-V2's label sets (global ranking)
QA_OPTIONS = "ABCDEFGHIJ"


class DataNotFound(FileNotFoundError):
    """A task's data is not where it was looked for; the message says how to provide it."""


# ---- annotation datasets in a hub download -----------------------------------------------------
def find_repo(data: str | os.PathLike | None, repo: str) -> Path | None:
    """A dataset repository's local files: ``DATA/<repo>``, else its snapshot in the HF cache."""
    if data is not None and (Path(data) / repo).is_dir():
        return Path(data) / repo
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = cache.expanduser() / f"datasets--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


def split_files(repo_dir: Path, config: str | None, split: str) -> list[Path]:
    """The data files of one config's split: from the dataset card's ``configs`` where it lists
    them, else by the hub's naming (``<config>/<split>-*.parquet``, ``data/<split>-*``, ...)."""
    for spec in _card_configs(repo_dir):
        if spec.get("config_name", "default") != (config or "default"):
            continue
        files = spec.get("data_files") or []
        files = [files] if isinstance(files, (str, dict)) else files
        patterns = [f["path"] for f in files if isinstance(f, dict) and f.get("split") == split]
        patterns = [p for group in patterns for p in ([group] if isinstance(group, str) else group)]
        found = sorted({p for pattern in patterns for p in repo_dir.glob(pattern) if p.is_file()})
        if found:
            return found
    folders = [repo_dir / config] if config else []
    folders += [repo_dir / "data", repo_dir]
    for folder in folders:
        found = sorted(p for p in folder.glob(f"{split}*") if p.is_file() and p.suffix in TABLE_SUFFIXES)
        if (folder / split).is_dir():
            found += sorted(p for p in (folder / split).iterdir() if p.suffix in TABLE_SUFFIXES)
        if found:
            return found
    return []


def _card_configs(repo_dir: Path) -> list[dict]:
    card = repo_dir / "README.md"
    if not card.is_file():
        return []
    match = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8"), re.S)
    meta = yaml.safe_load(match.group(1)) if match else None
    return list((meta or {}).get("configs") or [])


def read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    if path.suffix == ".json":
        rows = read_json(path)
        return rows if isinstance(rows, list) else list(rows.values())
    if path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def hub_rows(task: str, data, repo: str, config: str | None, split: str) -> list[dict] | None:
    """A split's rows from a local download; None where the repository is not there at all."""
    repo_dir = find_repo(data, repo)
    if repo_dir is None:
        return None
    files = split_files(repo_dir, config, split)
    if not files:
        where = f"config {config!r}, " if config else ""
        raise DataNotFound(f"{task}: {repo_dir} has no data files for {where}split {split!r} (looked for the "
                           f"dataset card's configs and {config or 'data'}/{split}-*.parquet); the download of "
                           f"{repo} looks partial: download it again")
    return [row for f in files for row in read_table(f)]


def missing_repo(task: str, data, repo: str, config: str | None = None) -> DataNotFound:
    where = f"{data}/{repo}" if data is not None else "DIR/" + repo
    return DataNotFound(
        f"{task}: its annotations ({repo}{', config ' + config if config else ''}) are not in {where} nor in the "
        f"Hugging Face cache, and the hub cannot be reached from here. Where the hub is reachable: "
        f"`hf download {repo} --repo-type dataset --local-dir {where}`; then pass --data {data or 'DIR'}")


def media_root(task: str, data, relative: str) -> Path:
    """A task's media folder under DATA; where only its archive is there, say how to unpack it."""
    root = Path(data) / relative
    if root.is_dir():
        return root
    archives = _archives_for(Path(data), relative)
    if archives:
        names = ", ".join(str(a) for a in archives)
        raise DataNotFound(f"{task}: {root} does not exist but {names} does: unpack it first (as VLM2Vec's "
                           f"download script does, e.g. `tar -xzf {archives[0].name}` in {archives[0].parent})")
    raise DataNotFound(f"{task}: {root} does not exist: download TIGER-Lab/MMEB-V2 into {data} (`hf download "
                       f"TIGER-Lab/MMEB-V2 --repo-type dataset --local-dir {data}`) and unpack its archives")


def _archives_for(data: Path, relative: str) -> list[Path]:
    parts = Path(relative).parts
    found = []
    for depth in range(len(parts), 0, -1):
        folder = data.joinpath(*parts[:depth - 1]) if depth > 1 else data
        found += sorted(p for p in folder.glob("*.tar.gz*") if p.is_file()) if folder.is_dir() else []
        if found:
            break
    return found


# ---- the parsers: annotation rows -> MMEB rows -------------------------------------------------
def _one_hot(n: int, k: int) -> list[float]:
    return [1.0 if j == k else 0.0 for j in range(n)]


def _frames(root: Path, *parts: str) -> str:
    return str(root.joinpath(*parts))


def _options_listing(question: str, options: list[str]) -> tuple[str, list[str]]:
    """VLM2Vec's ``qa_template``: the question with "(A) option" lines, and the lettered options."""
    lettered = [f"({QA_OPTIONS[k]}) {o}" for k, o in enumerate(options)]
    return (f"{question}\nOptions:\n" + "\n".join(lettered)).rstrip(), lettered


def video_classification(info: TaskInfo, rows, root: Path):
    out = [{"id": str(r["video_id"]), "qry_video": _frames(root, str(r["video_id"])), "tgt_text": [r["pos_text"]]}
           for r in rows]
    return out, [{"text": label} for label in read_json(VIDEO_LABELS)[info.name]]


def ssv2(info: TaskInfo, rows, root: Path):
    return [{"id": str(r["video_id"]), "qry_video": _frames(root, str(r["video_id"])), "tgt_text": list(r["neg_text"]),
             "tgt_rel": [1.0 if t == r["pos_text"] else 0.0 for t in r["neg_text"]]} for r in rows], None


def _retrieval(query_text: Callable[[dict], str], video_name: Callable[[dict], str]):
    def parse(info: TaskInfo, rows, root: Path):
        return [{"qry_text": query_text(r), "tgt_video": [_frames(root, video_name(r))]} for r in rows], None
    return parse


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def moment_retrieval(info: TaskInfo, rows, root: Path):
    out = []
    for r in rows:
        clips = root / _stem(r["video_path"])
        if not clips.is_dir():
            raise DataNotFound(f"{info.name}: no clip folders at {clips} (a partial download of the frames?)")
        cands = sorted(p.name for p in clips.iterdir() if p.is_dir() and p.name != "query")
        out.append({"qry_text": r["query"], "qry_video": str(clips / "query"),
                    "tgt_video": [str(clips / c) for c in cands],
                    "tgt_rel": [1.0 if c.startswith("positive") else 0.0 for c in cands]})
    return out, None


MOMENTSEEKER_INSTRUCTIONS = {"text": "Find the clip that corresponds to the given text:",
                             "image": "Select the video clip that aligns with the given text and image:",
                             "video": "Find the clip that corresponds to the given sentence and video segment:"}


def momentseeker(info: TaskInfo, rows, root: Path):
    clip = lambda path: str(root / "video_frames" / path.replace("/", "_").split(".mp4")[0])  # noqa: E731
    out = []
    for r in rows:
        row: dict[str, Any] = {"qry_text": r["query"]}
        source = r.get("input_frames") or ""
        if source.endswith(".mp4"):
            row.update(qry_inst=MOMENTSEEKER_INSTRUCTIONS["video"], qry_video=clip(source))
        elif source.endswith(".jpg"):
            row.update(qry_inst=MOMENTSEEKER_INSTRUCTIONS["image"], qry_img_path=str(root / f"query_{source}"))
        else:
            row["qry_inst"] = MOMENTSEEKER_INSTRUCTIONS["text"]
        pos = [e["output_path"] for e in r["positive_frames"]]
        neg = [e["output_path"] for e in r["negative_frames"]]
        row.update(tgt_video=[clip(p) for p in pos + neg], tgt_rel=[1.0] * len(pos) + [0.0] * len(neg))
        out.append(row)
    return out, None


def videomme(info: TaskInfo, rows, root: Path):
    return [{"id": str(r["question_id"]), "qry_text": r["question"] + "\n" + "\n".join(r["options"]),
             "qry_video": _frames(root, str(r["videoID"])),
             "tgt_text": [o[o.find(". "):].strip(". ") for o in r["options"]],
             "tgt_rel": _one_hot(len(r["options"]), QA_OPTIONS.index(r["answer"]))} for r in rows], None


def nextqa(info: TaskInfo, rows, root: Path):
    out = []
    for r in rows:
        options = [r[f"a{k}"] for k in range(5)]
        out.append({"id": f"{r['qid']}-{r['video']}", "qry_text": _options_listing(r["question"], options)[0],
                    "qry_video": _frames(root, str(r["video"])), "tgt_text": options,
                    "tgt_rel": _one_hot(5, int(r["answer"]))})
    return out, None


def egoschema(info: TaskInfo, rows, root: Path):
    return [{"id": str(r["question_idx"]), "qry_text": r["question"] + " ".join(r["option"]),
             "qry_video": _frames(root, str(r["video_idx"])),
             "tgt_text": [o[o.find(". "):].strip(". ") for o in r["option"]],
             "tgt_rel": _one_hot(len(r["option"]), int(r["answer"]))} for r in rows], None


def mvbench(info: TaskInfo, rows, root: Path):
    out = []
    for r in rows:
        text, lettered = _options_listing(r["question"], list(r["candidates"]))
        out.append({"qry_text": text, "qry_video": _frames(root, r["subset"], r["video"]), "tgt_text": lettered,
                    "tgt_rel": [1.0 if c == r["answer"] else 0.0 for c in r["candidates"]]})
    return out, None


def activitynetqa(info: TaskInfo, rows, root: Path):
    return [{"id": str(r["question_id"]), "qry_text": r["question"] + "? (A) yes; (B) no.",
             "qry_video": _frames(root, f"v_{r['video_name']}"), "tgt_text": ["yes", "no"],
             "tgt_rel": [float(r["answer"] == "yes"), float(r["answer"] == "no")]} for r in rows], None


VIDEO_PARSERS: dict[str, Callable] = {
    "video_classification": video_classification,
    "ssv2": ssv2,
    "msrvtt": _retrieval(lambda r: r["caption"], lambda r: str(r["video_id"])),
    "msvd": _retrieval(lambda r: r["caption"][0], lambda r: str(r["video_id"])),
    "didemo": _retrieval(lambda r: r["caption"], lambda r: _stem(r["video"])),
    "youcook2": _retrieval(lambda r: r["sentence"], lambda r: str(r["id"])),
    "vatex": _retrieval(lambda r: r["enCap"][0], lambda r: str(r["videoID"])),
    "moment_retrieval": moment_retrieval,
    "momentseeker": momentseeker,
    "videomme": videomme,
    "nextqa": nextqa,
    "egoschema": egoschema,
    "mvbench": mvbench,
    "activitynetqa": activitynetqa,
}

# MVBench is one config per subset (VLM2Vec-V2 reads all twenty and concatenates them).
MVBENCH_SUBSETS = (
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change",
    "fine_grained_pose", "character_order", "egocentric_navigation", "counterfactual_inference")


def visdoc_image(parser: str, root: Path, corpus_id: str) -> Path:
    """Where VLM2Vec-V2 keeps a page image: ``<corpus-id>.png`` (ViDoRe and the OOD sets), or a
    shortened name with a hash of the original (VisRAG's ids are file names, some very long)."""
    if parser != "visrag":
        return root / f"{corpus_id}.png"
    base, ext = os.path.splitext(corpus_id)
    return root / f"{base[:50]}_{hashlib.md5(corpus_id.encode('utf-8')).hexdigest()[:8]}{ext}"
