"""MMEB-V2 read as the hub distributes it (tests/mmeb_fixtures.py: a few rows of every loader
format in VLM2Vec-V2's schemas): queries, candidates, positives and ranking as VLM2Vec-V2's
parsers build them; missing and partial downloads named; `mmemb eval` going on without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmemb.cli import app
from mmemb.data.loaders import DataNotFound, load_task
from mmemb.data.mmeb import MMEB_V2
from mmemb.items import ImageError, load_visuals

from .mmeb_fixtures import write_mmeb_v2

VIDEO_TGT = "Understand the content of the provided video."


@pytest.fixture(scope="module")
def mmeb(tmp_path_factory):
    return write_mmeb_v2(tmp_path_factory.mktemp("mmeb-v2"))


@pytest.fixture(autouse=True)
def no_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing found outside --data


def task(name, data):
    return load_task(MMEB_V2[name], data=data)


def positive(t, q):
    (cid,) = [c for c, r in t.relevance[q.id].items() if r > 0]
    return next(c for c in t.candidates if c.id == cid)


def test_image_rows_from_the_instruct_dataset(mmeb):
    t = task("ImageNet-1K", mmeb)
    assert t.eval_type == "local" and len(t.queries) == 3
    q = t.queries[1]
    assert q.instruction == "Represent the given image for classification" and q.text is None
    assert q.images == [str(mmeb / "image-tasks" / "ImageNet-1K" / "1.JPEG")]
    assert positive(t, q).text == "goldfish" and positive(t, q).instruction is None  # the bare label
    assert len(t.candidate_lists[q.id]) == 3
    t2i = task("VisualNews_t2i", mmeb)
    q = t2i.queries[0]
    assert (q.text, q.instruction, q.images) == ("caption 0", "Retrieve an image of this news caption.", [])
    pos = positive(t2i, q)
    assert pos.images == [str(mmeb / "image-tasks" / "VisualNews_t2i" / "c0.jpg")]
    assert pos.instruction == "Represent the given image."  # <|image_1|> removed


def test_video_classification_and_retrieval(mmeb):
    t = task("HMDB51", mmeb)
    assert t.eval_type == "global" and len(t.candidates) == 51  # VLM2Vec-V2's label set
    q = t.queries[0]
    assert q.instruction == MMEB_V2["HMDB51"].qry_inst and positive(t, q).text == "brush_hair"
    frames = [Path(f).name for f in q.video]
    assert frames == [f"frame_{i:04d}.jpg" for i in (0, 1, 3, 4, 6, 7, 9, 11)]  # 8 of 12, floor spacing
    ssv2 = task("SmthSmthV2", mmeb)
    q = ssv2.queries[0]
    assert ssv2.eval_type == "local" and len(q.video) == 6  # fewer frames than 8: all of them
    assert [c.text for c in ssv2.candidates] == ["Closing something", "Opening something", "Folding something"]
    assert positive(ssv2, q).text == "Opening something"

    msrvtt = task("MSR-VTT", mmeb)
    assert msrvtt.eval_type == "global"
    assert [q.text for q in msrvtt.queries] == ["a woman is cooking", "a man is running"]
    pos = positive(msrvtt, msrvtt.queries[1])
    assert pos.instruction == VIDEO_TGT and pos.meta["video"].endswith("video_ret/MSR-VTT/video7021")
    for name, text, folder in (("MSVD", "a cat plays", "-4wsuPCjDBc_5_15"), ("DiDeMo", "the dog jumps", "4012_clip"),
                               ("YouCook2", "add the oil", "xHr8X2Wpmno_0"),
                               ("VATEX", "people dance", "Ptf_2VRj-V0_000122_000132")):
        t = task(name, mmeb)
        assert t.queries[0].text == text and positive(t, t.queries[0]).meta["video"].endswith(folder), name
        assert len(positive(t, t.queries[0]).video) == 4


def test_moment_retrieval(mmeb):
    t = task("QVHighlight", mmeb)
    q = t.queries[0]
    assert t.eval_type == "local" and q.text == "a man talks"
    assert q.meta["video"].endswith("RoripwjYFp8_60.0_210.0/query")
    names = [Path(t.candidates[[c.id for c in t.candidates].index(cid)].meta["video"]).name
             for cid in t.candidate_lists[q.id]]
    assert names == ["negative_0", "negative_1", "positive_0"]
    assert Path(positive(t, q).meta["video"]).name == "positive_0"

    seeker = task("MomentSeeker", mmeb)
    video_q, image_q, text_q = seeker.queries
    assert video_q.instruction == "Find the clip that corresponds to the given sentence and video segment:"
    assert video_q.meta["video"].endswith("video_frames/movie_1_q") and len(video_q.video) == 8
    assert image_q.instruction == "Select the video clip that aligns with the given text and image:"
    assert image_q.images == [str(mmeb / "video-tasks/frames/video_mret/MomentSeeker/query_img_7.jpg")]
    assert text_q.instruction == "Find the clip that corresponds to the given text:" and not text_q.has_visual
    assert Path(positive(seeker, video_q).meta["video"]).name == "movie_1_pos"
    assert Path(positive(seeker, text_q).meta["video"]).name == "movie_1_neg"


def test_video_qa(mmeb):
    mme = task("Video-MME", mmeb)
    q = mme.queries[0]
    assert q.text == "What is shown?\nA. a cat.\nB. a dog.\nC. a car.\nD. a bus."
    assert q.instruction == MMEB_V2["Video-MME"].qry_inst and positive(mme, q).text == "a dog"
    nextqa = task("NExTQA", mmeb)
    q = nextqa.queries[0]
    assert q.text == "why did the boy fall\nOptions:\n(A) tired\n(B) hungry\n(C) slipped\n(D) pushed\n(E) asleep"
    assert positive(nextqa, q).text == "slipped"  # candidates are the bare options
    ego = task("EgoSchema", mmeb)
    q = ego.queries[0]
    assert q.text.startswith("What does C do?A. cooks. B. cleans.") and positive(ego, q).text == "cleans"
    mvb = task("MVBench", mmeb)
    assert len(mvb.queries) == 20
    q = mvb.queries[3]
    assert positive(mvb, q).text == "(B) down" and q.meta["video"].endswith("MVBench/action_antonym/v3.mp4")
    anet = task("ActivityNetQA", mmeb)
    q = anet.queries[0]
    assert q.text == "is it sunny? (A) yes; (B) no." and positive(anet, q).text == "no"
    assert q.meta["video"].endswith("ActivityNetQA/v_abc")


def test_visual_documents(mmeb):
    t = task("ViDoRe_arxivqa", mmeb)
    assert [q.id for q in t.queries] == ["1"] and t.meta["dropped_queries"] == 1  # q2 has no judged page
    assert t.relevance == {"1": {"11": 1.0}} and len(t.candidates) == 3
    assert isinstance(t.candidates[0].images[0], bytes)  # pages from the parquet where not unpacked
    load_visuals(t.candidates[0])
    rag = task("VisRAG_ChartQA", mmeb)  # files found through the dataset card's configs
    long_page = rag.candidates[0].images[0]
    assert Path(long_page).is_file() and Path(long_page).parent.name == "VisRAG_ChartQA"
    assert rag.relevance == {"q0": {rag.candidates[0].id: 1.0}}


def test_missing_and_partial_downloads_name_task_and_file(mmeb, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mmeb, copy)
    shutil.rmtree(copy / "video-tasks" / "frames" / "video_cls")
    (copy / "video-tasks" / "frames" / "video_cls.tar.gz").write_bytes(b"archive")
    with pytest.raises(DataNotFound, match=r"HMDB51: .*video_cls/HMDB51 does not exist but .*video_cls.tar.gz"):
        task("HMDB51", copy)
    for f in (copy / "VLM2Vec" / "MSVD" / "data").iterdir():
        f.unlink()
    with pytest.raises(DataNotFound, match=r"MSVD: .*VLM2Vec/MSVD has no data files for split 'test'"):
        task("MSVD", copy)
    shutil.rmtree(copy / "VLM2Vec" / "VATEX")
    with pytest.raises(DataNotFound, match=r"VATEX: its annotations \(VLM2Vec/VATEX\) are not in .*hf download"):
        task("VATEX", copy)
    shutil.rmtree(copy / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video7021")
    t = task("MSR-VTT", copy)
    with pytest.raises(ImageError, match=r"video has no frames \(nothing in .*MSR-VTT/video7021\)"):
        load_visuals(positive(t, t.queries[1]))
    shutil.rmtree(copy / "image-tasks" / "ImageNet-1K")
    shutil.rmtree(copy / "image-tasks" / "VisualNews_t2i")
    (copy / "image-tasks" / "mmeb_v1.tar.gz").write_bytes(b"archive")
    with pytest.raises(DataNotFound, match=r"ImageNet-1K: .*image-tasks/MMEB does not exist but .*mmeb_v1.tar.gz"):
        task("ImageNet-1K", copy)


def test_eval_goes_on_without_a_missing_task(mmeb, tiny_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mmeb, copy)
    shutil.rmtree(copy / "VLM2Vec" / "MSVD")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--model", tiny_path, "--tasks", "MSVD,HMDB51,ActivityNetQA",
                                      "--data", str(copy), "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert "not evaluated: MSVD: its annotations (VLM2Vec/MSVD)" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["missing_tasks"]) == {"MSVD"} and set(summary["tasks"]) == {"HMDB51", "ActivityNetQA"}
    score = json.loads((out / "HMDB51" / "score.json").read_text())
    assert score["num_queries"] == 2 and score["num_candidates"] == 51 and score["failures"]["count"] == 0
