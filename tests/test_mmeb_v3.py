"""MMEB-V3: the 190-task registry from its public configs, its text tasks read from an MMEB-V3
download (tests/mmeb_fixtures.py), and the tasks mmemb cannot load named as such."""

from __future__ import annotations

import collections
import json

import pytest
from typer.testing import CliRunner

from mmemb.cli import app
from mmemb.data.loaders import load_task
from mmemb.data.mmeb import MMEB_V3, resolve_tasks
from mmemb.data.mmeb_v3 import TaskNotSupported

from .mmeb_fixtures import write_mmeb_v3_text


def test_registry_has_the_190_tasks_with_their_metrics():
    by_modality = collections.Counter(t.modality for t in MMEB_V3.values())
    assert by_modality == {"text": 53, "image": 37, "tool": 35, "visdoc": 24, "video": 18, "audio": 11, "gui": 8,
                           "memory": 4}
    assert {t.metric for t in MMEB_V3.values() if t.modality == "text"} == {"ndcg@5"}
    assert {t.metric for t in MMEB_V3.values() if t.modality in ("tool", "gui", "memory", "audio")} == {"hit@1"}
    assert MMEB_V3["MCMR"].qry_inst == "Find an image-text pair that matches the given query"
    assert len(resolve_tasks("mmeb-v3")) == 190 and {t.benchmark for t in resolve_tasks("mmeb-v3")} == {"mmeb-v3"}
    assert [t.name for t in resolve_tasks("text-FollowIR")] == ["core17-instructions", "news21-instructions",
                                                                "robust04-instructions"]
    result = CliRunner().invoke(app, ["tasks", "--benchmark", "mmeb-v3", "--json"])
    assert result.exit_code == 0 and len(json.loads(result.output)) == 190


def test_text_tasks_from_an_mmeb_v3_download(tmp_path):
    data = write_mmeb_v3_text(tmp_path / "v3")
    aops = load_task(MMEB_V3["aops"], data=data)
    assert aops.eval_type == "global" and aops.metric == "ndcg@5" and len(aops.candidates) == 3
    assert aops.relevance == {"q1": {"d2": 1.0}, "q2": {}}  # the unjudged query stays (it scores 0)
    assert aops.queries[0].text == "Find x if 2x = 6." and aops.queries[0].instruction is None
    core = load_task(MMEB_V3["core17-instructions"], data=data)
    assert core.queries[0].text == "Relevant documents name a ship. oil spills"  # FollowIR: instruction first
    assert core.candidates[0].text == "Tanker\nThe ship leaked." and core.relevance == {"301": {"a": 2.0}}
    nano = load_task(MMEB_V3["NanoArguAna"], data=data)
    assert nano.relevance == {"n1": {"c1": 1.0}}
    with pytest.raises(FileNotFoundError, match=r"NanoClimateFEVER: .*NanoClimateFEVER/queries/train-00000-of-00001"):
        load_task(MMEB_V3["NanoClimateFEVER"], data=data)


@pytest.mark.parametrize("name, reason", [("apibank", "ToolDe parser"), ("GAE-GUIAct_q2t", "GUI parser"),
                                          ("REALTALK", "memory parser"), ("MCMR", "MCMR parser"),
                                          ("Clotho", "no audio encoder")])
def test_tasks_without_a_loader_say_why(name, reason, tmp_path):
    with pytest.raises(TaskNotSupported, match=rf"{name}: .*{reason}"):
        load_task(MMEB_V3[name], data=tmp_path)
