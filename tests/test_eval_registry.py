"""The MMEB-V2 registry (78 tasks), task selection, and `mmemb tasks`."""

import json
import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from mmemb.cli import app
from mmemb.data.mmeb import MMEB_V2, MMEB_V3, TaskSelectionError, resolve_tasks

from .eval_fixtures import write_minimmeb

ISSUE_NAMES = {
    "image-classification": "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A ImageNet-R ObjectNet "
                            "Country211",
    "image-vqa": "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA TextVQA",
    "image-retrieval": "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA FashionIQ "
                       "Wiki-SS-NQ OVEN EDIS",
    "image-grounding": "MSCOCO RefCOCO RefCOCO-Matching Visual7W-Pointing",
    "video-classification": "K700 SmthSmthV2 HMDB51 UCF101 Breakfast",
    "video-qa": "MVBench Video-MME NExTQA EgoSchema ActivityNetQA",
    "video-retrieval": "DiDeMo MSR-VTT MSVD VATEX YouCook2",
    "video-moment_retrieval": "QVHighlight Charades-STA MomentSeeker",
    "visdoc-ood": "ViDoSeek-page ViDoSeek-doc MMLongBench-page MMLongBench-doc",
}


def test_registry_counts_names_metrics_and_ranking_types():
    assert len(MMEB_V2) == 78
    assert Counter(t.modality for t in MMEB_V2.values()) == {"image": 36, "video": 18, "visdoc": 24}
    groups = Counter(t.group for t in MMEB_V2.values())
    assert groups == {"image-classification": 10, "image-vqa": 10, "image-retrieval": 12, "image-grounding": 4,
                      "video-classification": 5, "video-qa": 5, "video-retrieval": 5, "video-moment_retrieval": 3,
                      "visdoc-vidore_v1": 10, "visdoc-vidore_v2": 4, "visdoc-visrag": 6, "visdoc-ood": 4}
    for group, names in ISSUE_NAMES.items():
        assert [t.name for t in MMEB_V2.values() if t.group == group] == names.split()
    assert {t.metric for t in MMEB_V2.values() if t.modality != "visdoc"} == {"hit@1"}
    assert {t.metric for t in MMEB_V2.values() if t.modality == "visdoc"} == {"ndcg@5"}
    global_non_doc = {t.name for t in MMEB_V2.values() if t.eval_type == "global" and t.modality != "visdoc"}
    assert global_non_doc == {"HMDB51", "UCF101", "K700", "Breakfast", "DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2"}
    assert all(t.eval_type == "global" for t in MMEB_V2.values() if t.modality == "visdoc")
    assert all(t.qry_inst for t in MMEB_V2.values())
    assert MMEB_V2["MSR-VTT"].tgt_inst == "Understand the content of the provided video."
    assert MMEB_V2["ViDoRe_arxivqa"].qry_inst == "Find a document image that matches the given query:"


def test_resolve_groups_names_and_errors(tmp_path):
    assert len(resolve_tasks("mmeb-v2")) == 78
    assert len(resolve_tasks("mmeb-v2-image")) == 36
    assert [t.name for t in resolve_tasks("video-classification")] == ISSUE_NAMES["video-classification"].split()
    picked = resolve_tasks("image-grounding, MSCOCO ,visdoc-vidore_v2")
    assert len(picked) == 8 and picked[0].name == "MSCOCO"  # no duplicates, order kept
    with pytest.raises(TaskSelectionError, match="unknown task or group 'NoSuchTask'"):
        resolve_tasks("NoSuchTask")
    with pytest.raises(TaskSelectionError, match="needs --data"):
        resolve_tasks("minimmeb")
    root = write_minimmeb(tmp_path / "mini")
    mini = resolve_tasks("minimmeb", data=root)
    assert [(t.name, t.kind, t.benchmark) for t in mini] == [("MiniClass", "easy", "minimmeb"),
                                                              ("MiniCaption", "compositional", "minimmeb")]
    assert [t.name for t in resolve_tasks("minimmeb-compositional,MiniClass", data=root)] == ["MiniCaption", "MiniClass"]


def test_tasks_cli_lists_registry_and_minimmeb(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["tasks", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 78 and {"name", "modality", "meta_task", "metric", "eval_type"} <= set(rows[0])
    res = runner.invoke(app, ["tasks"])
    assert res.exit_code == 0 and "78 tasks" in res.output
    assert re.search(r"^HMDB51 +video +classification +hit@1 +global", res.output, re.M)
    root = write_minimmeb(tmp_path / "mini")
    res = runner.invoke(app, ["tasks", "--benchmark", "minimmeb", "--data", str(root), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.output)] == ["MiniClass", "MiniCaption"]
    res = runner.invoke(app, ["tasks", "--benchmark", "minimmeb"])
    assert res.exit_code != 0 and "needs --data" in res.output


def test_task_globs(tmp_path):
    every = {**MMEB_V3, **MMEB_V2}  # globs match over every registered task
    assert [t.name for t in resolve_tasks("*QA")] == [n for n in every if n.lower().endswith("qa")]
    assert [t.name for t in resolve_tasks("msCOCO_*2*, DocVQA")] == ["MSCOCO_t2i", "MSCOCO_i2t", "DocVQA"]
    root = write_minimmeb(tmp_path / "mini")
    assert [t.name for t in resolve_tasks("Mini*", data=root)] == ["MiniClass", "MiniCaption"]
    with pytest.raises(TaskSelectionError, match="no task matches 'Nothing\\*'"):
        resolve_tasks("Nothing*")
