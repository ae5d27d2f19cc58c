"""A few rows of MMEB-V2 (and of MMEB-V3's text tasks) laid out as distributed, in the schemas
VLM2Vec-V2's parsers read (``src/data/eval_dataset``): the TIGER-Lab/MMEB-V2 media (image-tasks/, video-tasks/frames/,
visdoc-tasks/) and each annotation dataset in a folder named by its repository id, as
``hf download REPO --repo-type dataset --local-dir DIR/REPO`` leaves it (one parquet per split,
under the config's folder; some with a dataset card listing the files)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmemb.data.mmeb_hub import MVBENCH_SUBSETS

from .eval_fixtures import write_image


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _split(root: Path, repo: str, config: str | None, split: str, rows: list[dict]) -> None:
    _parquet(root / repo / (config or "data") / f"{split}-00000-of-00001.parquet", rows)


def _frames(folder: Path, n: int, seed: int) -> None:
    for i in range(n):
        write_image(folder / f"frame_{i:04d}.jpg", seed=seed + i, size=(8, 8))


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((16, 12, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def write_image_tasks(root: Path) -> None:
    """ImageNet-1K (classification: label texts) and VisualNews_t2i (text -> image candidates)."""
    for i in range(3):
        write_image(root / "image-tasks" / "ImageNet-1K" / f"{i}.JPEG", seed=i)
        write_image(root / "image-tasks" / "VisualNews_t2i" / f"c{i}.jpg", seed=10 + i)
    labels = ["tench", "goldfish", "great white shark"]
    _split(root, "ziyjiang/MMEB_Test_Instruct", "ImageNet-1K", "test", [
        {"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
         "qry_img_path": f"ImageNet-1K/{i}.JPEG", "tgt_inst": "", "tgt_text": labels[i:] + labels[:i],
         "tgt_img_path": ["", "", ""]} for i in range(3)])
    _split(root, "ziyjiang/MMEB_Test_Instruct", "VisualNews_t2i", "test", [
        {"qry_inst": "Retrieve an image of this news caption.", "qry_text": f"caption {i}", "qry_img_path": "",
         "tgt_inst": "<|image_1|> Represent the given image.", "tgt_text": ["", "", ""],
         "tgt_img_path": [f"VisualNews_t2i/c{(i + k) % 3}.jpg" for k in range(3)]} for i in range(2)])


def write_video_tasks(root: Path) -> None:
    frames = root / "video-tasks" / "frames"
    # classification against the label set (global), and SSv2's own candidate lists (local)
    for v in ("brush_hair_0", "wave_1"):
        _frames(frames / "video_cls" / "HMDB51" / v, 12, len(v))
    _split(root, "VLM2Vec/HMDB51", None, "test", [{"video_id": "brush_hair_0", "pos_text": "brush_hair"},
                                                  {"video_id": "wave_1", "pos_text": "wave"}])
    _frames(frames / "video_cls" / "SSv2" / "74225", 6, 1)
    _split(root, "VLM2Vec/SmthSmthV2", None, "test", [
        {"video_id": 74225, "pos_text": "Opening something",
         "neg_text": ["Closing something", "Opening something", "Folding something"]}])
    # retrieval: text -> every test video (global)
    for v in ("video7020", "video7021"):
        _frames(frames / "video_ret" / "MSR-VTT" / v, 9, 3)
    _split(root, "VLM2Vec/MSR-VTT", "test_1k", "test", [
        {"video_id": "video7020", "video": "TestVideo/video7020.mp4", "caption": "a woman is cooking"},
        {"video_id": "video7021", "video": "TestVideo/video7021.mp4", "caption": "a man is running"}])
    _frames(frames / "video_ret" / "MSVD" / "-4wsuPCjDBc_5_15", 4, 5)
    _split(root, "VLM2Vec/MSVD", None, "test", [{"video_id": "-4wsuPCjDBc_5_15", "video": "-4wsuPCjDBc_5_15.avi",
                                                 "caption": ["a cat plays", "a kitten plays"]}])
    _frames(frames / "video_ret" / "DiDeMo" / "4012_clip", 4, 6)
    _split(root, "VLM2Vec/DiDeMo", None, "test", [{"video": "videos/4012_clip.mp4", "caption": "the dog jumps"}])
    _frames(frames / "video_ret" / "YouCook2" / "xHr8X2Wpmno_0", 4, 7)
    _split(root, "lmms-lab/YouCook2", None, "val", [{"id": "xHr8X2Wpmno_0", "video_path": "val/xHr8X2Wpmno.mp4",
                                                     "sentence": "add the oil"}])
    _frames(frames / "video_ret" / "VATEX" / "Ptf_2VRj-V0_000122_000132", 4, 8)
    _split(root, "VLM2Vec/VATEX", None, "test", [{"videoID": "Ptf_2VRj-V0_000122_000132",
                                                  "enCap": ["people dance", "a group dances"]}])
    # moment retrieval: the query video and its clips in one folder per video (local)
    clips = frames / "video_mret" / "QVHighlight" / "RoripwjYFp8_60.0_210.0"
    for k, name in enumerate(("query", "positive_0", "negative_0", "negative_1")):
        _frames(clips / name, 4, 20 + k)
    _split(root, "VLM2Vec/QVHighlight", None, "test",
           [{"query": "a man talks", "video_path": "RoripwjYFp8_60.0_210.0.mp4"}])
    seeker = frames / "video_mret" / "MomentSeeker"
    for name in ("movie_1_q", "movie_1_pos", "movie_1_neg"):
        _frames(seeker / "video_frames" / name, 8, 30)
    write_image(seeker / "query_img_7.jpg", seed=40)
    pos, neg = [{"output_path": "movie/1_pos.mp4"}], [{"output_path": "movie/1_neg.mp4"}]
    _split(root, "VLM2Vec/MomentSeeker", None, "test", [
        {"query": "the door opens", "input_frames": "movie/1_q.mp4", "positive_frames": pos, "negative_frames": neg},
        {"query": "same scene", "input_frames": "img_7.jpg", "positive_frames": pos, "negative_frames": neg},
        {"query": "just text", "input_frames": "", "positive_frames": neg, "negative_frames": pos}])
    # video QA (local option lists)
    qa = frames / "video_qa"
    _frames(qa / "Video-MME" / "fFjv93ACGo8", 4, 50)
    _split(root, "VLM2Vec/Video-MME", None, "test", [
        {"question": "What is shown?", "videoID": "fFjv93ACGo8",
         "options": ["A. a cat.", "B. a dog.", "C. a car.", "D. a bus."], "answer": "B", "question_id": "001-1",
         "domain": "Knowledge", "sub_category": "Humanity"}])
    _frames(qa / "NExTQA" / "4010069381", 4, 51)
    _split(root, "VLM2Vec/NExTQA", "MC", "test", [
        {"video": 4010069381, "question": "why did the boy fall", "answer": 2, "qid": 6, "type": "CW",
         "a0": "tired", "a1": "hungry", "a2": "slipped", "a3": "pushed", "a4": "asleep"}])
    _frames(qa / "EgoSchema" / "001934bb", 4, 52)
    _split(root, "VLM2Vec/EgoSchema", "Subset", "test", [
        {"video_idx": "001934bb", "question": "What does C do?", "answer": "1", "question_idx": "q1",
         "option": ["A. cooks.", "B. cleans.", "C. reads.", "D. sleeps.", "E. runs."]}])
    for k, subset in enumerate(MVBENCH_SUBSETS):
        _frames(qa / "MVBench" / subset / f"v{k}.mp4", 2, 60 + k)
        _split(root, "VLM2Vec/MVBench", subset, "train", [
            {"question": f"What happens in {subset}?", "video": f"v{k}.mp4", "candidates": ["up", "down", "left"],
             "answer": "down"}])
    _frames(qa / "ActivityNetQA" / "v_abc", 4, 90)
    _split(root, "VLM2Vec/ActivityNetQA", None, "test", [{"video_name": "abc", "question": "is it sunny",
                                                          "answer": "no", "question_id": "a1"}])


def write_visdoc_tasks(root: Path) -> None:
    """ViDoRe (pages as parquet image structs) and VisRAG (pages unpacked as VLM2Vec-V2 names them,
    files listed by the dataset card)."""
    repo = "vidore/arxivqa_test_subsampled_beir"
    _split(root, repo, "queries", "test", [{"query-id": 1, "query": "What does figure 2 show?"},
                                           {"query-id": 2, "query": "unjudged"}])
    _split(root, repo, "corpus", "test", [{"corpus-id": c, "image": {"bytes": _png(c), "path": f"{c}.png"}}
                                          for c in (10, 11, 12)])
    _split(root, repo, "qrels", "test", [{"query-id": 1, "corpus-id": 11, "score": 1}])
    repo_dir = root / "openbmb" / "VisRAG-Ret-Test-ChartQA"
    names = ["chart_" + "x" * 60 + ".png", "small.png"]
    _parquet(repo_dir / "q" / "train.parquet", [{"query-id": "q0", "query": "which year peaks?"}])
    _parquet(repo_dir / "c" / "train.parquet", [{"corpus-id": n, "image": {"bytes": None, "path": n}} for n in names])
    _parquet(repo_dir / "r" / "train.parquet", [{"query-id": "q0", "corpus-id": names[0], "score": 1}])
    (repo_dir / "README.md").write_text(
        "---\nconfigs:\n- config_name: queries\n  data_files:\n  - split: train\n    path: q/train.parquet\n"
        "- config_name: corpus\n  data_files:\n  - split: train\n    path: c/*.parquet\n"
        "- config_name: qrels\n  data_files:\n  - split: train\n    path: r/train.parquet\n---\n# VisRAG ChartQA\n")
    pages = root / "visdoc-tasks" / "VisRAG_ChartQA"
    for k, n in enumerate(names):
        base, ext = n.rsplit(".", 1)
        write_image(pages / f"{base[:50]}_{hashlib.md5(n.encode()).hexdigest()[:8]}.{ext}", seed=70 + k)


def write_mmeb_v2(root: Path) -> Path:
    write_image_tasks(root)
    write_video_tasks(root)
    write_visdoc_tasks(root)
    return root


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_mmeb_v3_text(root: Path) -> Path:
    """MMEB-V3 text tasks in an MMEB-V3 download's layout: BRIGHT (gold ids in the query rows),
    FollowIR and InfoSearch (instructions in the query rows, qrels_og), NanoBEIR (BEIR parquet)."""
    text = root / "text-tasks"
    _parquet(text / "BRIGHT" / "examples" / "aops-00000-of-00001.parquet",
             [{"id": "q1", "query": "Find x if 2x = 6.", "gold_ids": ["d2"]},
              {"id": "q2", "query": "Unjudged question.", "gold_ids": []}])
    _parquet(text / "BRIGHT" / "documents" / "aops-00000-of-00001.parquet",
             [{"id": f"d{k}", "content": f"document {k}"} for k in range(3)])
    follow = text / "FollowIR" / "core17-instructions"
    _jsonl(follow / "queries.jsonl",
           [{"_id": "301", "text": "oil spills", "instruction_og": "Relevant documents name a ship."}])
    _jsonl(follow / "corpus.jsonl",
           [{"_id": "a", "title": "Tanker", "text": "The ship leaked."}, {"_id": "b", "text": "Weather."}])
    _jsonl(follow / "qrels_og" / "test.jsonl", [{"query-id": "301", "corpus-id": "a", "score": 2},
                                               {"query-id": "301", "corpus-id": "b", "score": 0}])
    nano = text / "NanoBEIR" / "NanoArguAna"
    _parquet(nano / "queries" / "train-00000-of-00001.parquet", [{"_id": "n1", "text": "argument"}])
    _parquet(nano / "corpus" / "train-00000-of-00001.parquet",
             [{"_id": "c1", "text": "counter"}, {"_id": "c2", "text": "other"}])
    _parquet(nano / "qrels" / "train-00000-of-00001.parquet", [{"query-id": "n1", "corpus-id": "c1"}])
    return root
