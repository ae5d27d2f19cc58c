"""Loaders on small fixtures written in each format: MMEB image rows (jsonl and parquet), video
frame folders (local and global ranking), BEIR visual documents, MiniMMEB; and the offline hub."""

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmemb.data.loaders import DataNotFound, load_task, sample_frames
from mmemb.data.mmeb import MMEB_V2, resolve_tasks

from .eval_fixtures import write_image, write_jsonl, write_minimmeb


def test_image_rows_placeholder_instruction_split_positive_first_and_parquet(tmp_path):
    root = tmp_path / "mmeb"
    img = write_image(root / "image-tasks" / "MMEB" / "coco" / "q0.jpg", seed=0)
    rows = [
        # V2 style: separate instruction, with the phi-3-v placeholder
        {"qry_inst": "<|image_1|>\nFind an image caption describing the given everyday image.", "qry_text": "",
         "qry_img_path": "coco/q0.jpg", "tgt_inst": "", "tgt_text": ["a dog", "a cat", "a car"],
         "tgt_img_path": ["", "", ""]},
        # V1 style: the instruction is the start of qry_text
        {"qry_text": "<|image_1|>\nFind an image caption describing the given everyday image.\n",
         "qry_img_path": "coco/q0.jpg", "tgt_text": ["a cat", "a dog", "a dog"], "tgt_img_path": ["", "", ""]},
    ]
    write_jsonl(root / "image-tasks" / "MSCOCO_i2t.jsonl", rows)
    task = load_task(MMEB_V2["MSCOCO_i2t"], data=root)
    q0, q1 = task.queries
    assert q0.instruction == q1.instruction == "Find an image caption describing the given everyday image."
    assert q0.text is None and q1.text is None and q0.images == [img]
    assert task.eval_type == "local" and task.metric == "hit@1"
    # distinct candidates form one pool; each row keeps its list; the first one is the positive
    assert [c.text for c in task.candidates] == ["a dog", "a cat", "a car"]
    assert task.candidate_lists == {"0": ["c0", "c1", "c2"], "1": ["c1", "c0"]}
    assert task.relevance == {"0": {"c0": 1.0}, "1": {"c1": 1.0}}
    assert task.meta["candidate_refs"] == 6 and task.meta["modality"] == "image"

    # the same rows as parquet files in a task folder (the hub's layout)
    (root / "image-tasks" / "MSCOCO_i2t.jsonl").unlink()
    (root / "image-tasks" / "MSCOCO_i2t").mkdir()
    pq.write_table(pa.Table.from_pylist([{**rows[0], "qry_text": "x"}]),
                   root / "image-tasks" / "MSCOCO_i2t" / "test-00000-of-00001.parquet")
    task = load_task(MMEB_V2["MSCOCO_i2t"], data=root)
    assert task.queries[0].text == "x" and len(task.candidates) == 3


def _frames(folder: Path, n: int, seed: int) -> Path:
    for i in range(n):
        write_image(folder / f"frame_{i}.jpg", seed=seed + i, size=(8, 8))
    return folder


def test_frame_sampling_is_uniform_in_natural_order(tmp_path):
    folder = _frames(tmp_path / "v", 12, 0)
    names = [Path(p).name for p in sample_frames(folder, 8)]
    # VLM2Vec-V2's rule: floor(k * 11 / 7); frame_10 sorts after frame_9
    assert names == [f"frame_{i}.jpg" for i in (0, 1, 3, 4, 6, 7, 9, 11)]
    short = _frames(tmp_path / "s", 5, 50)
    assert [Path(p).name for p in sample_frames(short, 8)] == [f"frame_{i}.jpg" for i in range(5)]  # all of them
    assert sample_frames(tmp_path / "missing") == []


def test_video_global_classification_with_label_corpus(tmp_path):
    base = tmp_path / "mmeb" / "video-tasks"
    for v in ("a", "b"):
        _frames(base / "frames" / "HMDB51" / v, 10, ord(v))
    rows = [{"qry_video": "frames/HMDB51/a", "tgt_text": ["run"]},
            {"qry_video": "frames/HMDB51/b", "tgt_text": ["walk"]},
            {"qry_video": "frames/HMDB51/gone", "tgt_text": ["run"]}]
    write_jsonl(base / "HMDB51" / "test.jsonl", rows)
    write_jsonl(base / "HMDB51" / "corpus.jsonl", [{"text": w} for w in ("walk", "run", "jump")])
    task = load_task(MMEB_V2["HMDB51"], data=tmp_path / "mmeb")
    assert task.eval_type == "global" and task.candidate_lists is None
    assert [c.text for c in task.candidates] == ["walk", "run", "jump"]  # the whole label set
    assert task.relevance == {"0": {"c1": 1.0}, "1": {"c0": 1.0}, "2": {"c1": 1.0}}
    q = task.queries[0]
    assert q.instruction == MMEB_V2["HMDB51"].qry_inst and len(q.video) == 8 and q.images == []
    assert task.queries[2].video == []  # missing frames: fails as "video has no frames" when encoded


def test_video_local_rows_with_clip_candidates(tmp_path):
    base = tmp_path / "mmeb" / "video-tasks"
    for clip in ("q", "pos", "neg"):
        _frames(base / "frames" / "qvh" / clip, 4, len(clip))
    write_jsonl(base / "QVHighlight" / "test.jsonl", [
        {"qry_text": "a man opens a door", "qry_video": "frames/qvh/q", "tgt_video": ["frames/qvh/pos", "frames/qvh/neg"]}])
    task = load_task(MMEB_V2["QVHighlight"], data=tmp_path / "mmeb")
    assert task.eval_type == "local"
    pos, neg = task.candidates
    assert pos.instruction == "Understand the content of the provided video." and pos.text is None
    assert len(pos.video) == 4 and pos.video[0].endswith("pos/frame_0.jpg")
    assert task.relevance == {"0": {pos.id: 1.0}}


def test_visdoc_beir_graded_relevance_and_global_corpus(tmp_path):
    folder = tmp_path / "mmeb" / "visdoc-tasks" / "ViDoRe_esg_reports_v2_multilingual"
    folder.mkdir(parents=True)
    page_bytes = Path(write_image(tmp_path / "p.png", seed=3)).read_bytes()
    write_image(folder / "pages" / "p1.png", seed=1)
    write_jsonl(folder / "queries.jsonl", [{"query-id": "q1", "query": "revenue 2021?"},
                                           {"query-id": "q2", "query": "no answer here"}])
    pq.write_table(pa.Table.from_pylist([{"corpus-id": "p0", "image": {"bytes": page_bytes, "path": None}},
                                         {"corpus-id": "p1", "image": {"bytes": None, "path": "pages/p1.png"}},
                                         {"corpus-id": "p2", "image": {"bytes": page_bytes, "path": None}}]),
                   folder / "corpus.parquet")
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tp1\t2\nq1\tp2\t1\nq2\tp0\t0\n")
    task = load_task(MMEB_V2["ViDoRe_esg_reports_v2_multilingual"], data=tmp_path / "mmeb")
    assert task.eval_type == "global" and task.metric == "ndcg@5"
    assert [q.id for q in task.queries] == ["q1"] and task.meta["dropped_queries"] == 1
    assert task.relevance == {"q1": {"p1": 2.0, "p2": 1.0}}
    assert task.queries[0].instruction == "Find a document image that matches the given query:"
    p0, p1, _ = task.candidates
    assert p0.images == [page_bytes] and p1.images == [str(folder / "pages" / "p1.png")]
    assert p1.instruction == "Understand the content of the provided document image."


def test_minimmeb_rows_keep_meta_and_kind(tmp_path):
    root = write_minimmeb(tmp_path / "mini", n_queries=3, n_cands=4)
    task = load_task(resolve_tasks("MiniCaption", data=root)[0], data=root)
    assert task.meta["kind"] == "compositional" and task.meta["benchmark"] == "minimmeb"
    q = task.queries[1]
    assert q.text == "Which word?" and q.meta == {"digits": [1]}
    assert q.instruction == "Represent the given image for classification."
    assert q.images == [str(root / "images" / "MiniCaption" / "001.png")]


def test_offline_hub_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataNotFound, match=r"hub cannot be reached.*--data DIR"):
        load_task(MMEB_V2["VisRAG_ChartQA"])
    with pytest.raises(DataNotFound, match=r"image-tasks/mmeb_v1.tar.gz"):
        load_task(MMEB_V2["ImageNet-1K"])
    with pytest.raises(DataNotFound, match=r"MSR-VTT: its annotations \(VLM2Vec/MSR-VTT, config test_1k\)"):
        load_task(MMEB_V2["MSR-VTT"], data=tmp_path)
    with pytest.raises(DataNotFound, match=r"ziyjiang/MMEB_Test_Instruct.*hub cannot be reached"):
        load_task(MMEB_V2["ImageNet-1K"], data=tmp_path)
    assert time.perf_counter() - start < 5


def test_hub_rows_when_reachable(monkeypatch):
    """Where the hub answers, BEIR splits come from `datasets.load_dataset` (faked here)."""
    import datasets

    import mmemb.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mmemb.hub, "hub_reachable", lambda timeout=3.0: True)
    tables = {"queries": [{"query-id": "1", "query": "q"}], "corpus": [{"corpus-id": "d", "image": b"png"}],
              "qrels": [{"query-id": "1", "corpus-id": "d", "score": 1}]}
    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return tables[config]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task(MMEB_V2["VisRAG_ChartQA"])
    assert calls[0] == ("openbmb/VisRAG-Ret-Test-ChartQA", "queries", "train")
    assert task.relevance == {"1": {"d": 1.0}} and task.candidates[0].images == [b"png"]
