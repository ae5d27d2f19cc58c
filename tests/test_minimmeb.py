"""MiniMMEB: disjoint splits, MMEB formats, hard candidates, and the benchmark teacher's types."""

from __future__ import annotations

import random
import re

import pytest

from mmemb.data import minimmeb_tasks as T
from mmemb.data.minimmeb import BuildConfig, build, load_digit_scans, load_pairs, manifest
from mmemb.data.minimmeb_teacher import TYPES, candidate_rationales, rationale
from mmemb.fileio import read_jsonl


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mm") / "minimmeb", BuildConfig(seed=3, train_pairs=300, val_queries=5,
                                                                        test_queries=20))


def test_scan_splits_are_disjoint_and_cover_all():
    scans = load_digit_scans(seed=0)
    sets = {s: set(v.ids.tolist()) for s, v in scans.items()}
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"] and not sets["val"] & sets["test"]
    assert sum(len(v) for v in sets.values()) == 1797
    assert all(len(scans["test"].by_class[c]) > 30 for c in range(10))


def test_manifest_and_counts(bench):
    m = manifest(bench)
    assert set(m["tasks"]) == set(T.TASKS)
    assert {t: v["kind"] for t, v in m["tasks"].items()} == {t: s.kind for t, s in T.TASKS.items()}
    assert all(v["counts"] == {"train": 50, "val": 5, "test": 20} for v in m["tasks"].values())


def test_eval_rows_in_mmeb_format(bench):
    scans = load_digit_scans(seed=3)
    test_scans = set(scans["test"].ids.tolist())
    for task, spec in T.TASKS.items():
        for row in read_jsonl(bench / "test" / f"{task}.jsonl"):
            assert set(row) == {"qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path", "meta"}
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == spec.n_candidates
            assert 10 <= spec.n_candidates <= 40
            meta = row["meta"]
            assert set(meta["scans"]) <= test_scans  # no scan of another split
            if spec.target_is_image:
                assert all(p and (bench / p).is_file() for p in row["tgt_img_path"])
            else:
                assert row["tgt_text"][0] == str(meta["answer"])  # positive first
                assert len(set(row["tgt_text"])) == spec.n_candidates
            if spec.query_is_image:
                assert (bench / row["qry_img_path"]).is_file()


def test_compositional_candidates_are_near_misses(bench):
    for row in read_jsonl(bench / "test" / "DigitSum.jsonl"):
        answer = int(row["tgt_text"][0])
        assert sum(row["meta"]["digits"]) == answer
        assert all(abs(int(c) - answer) <= 20 for c in row["tgt_text"])


def test_training_pairs_load_with_images(bench):
    pairs = load_pairs(bench, ["DigitGround", "DigitSum"])
    assert len(pairs) == 100
    g = pairs[0]
    assert g.dataset == "DigitGround" and g.positive.images and len(g.negatives) == 3
    assert all(__import__("pathlib").Path(p).is_file() for p in g.query.images)


def test_build_is_deterministic(tmp_path, bench):
    again = build(tmp_path / "again", BuildConfig(seed=3, train_pairs=300, val_queries=5, test_queries=20))
    for task in T.TASKS:
        assert (again / "test" / f"{task}.jsonl").read_text() == (bench / "test" / f"{task}.jsonl").read_text()


def test_teacher_types_have_their_defects():
    rng = random.Random(0)
    for _ in range(200):
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 4))]
        meta = {"task": "DigitSum", "digits": digits}
        faithful = rationale("faithful", meta, rng)
        assert faithful.endswith(f"={sum(digits)}.")
        misread = rationale("misread", meta, rng)
        read = [int(d) for d in re.match(r"digits ([\d ]+)\.", misread).group(1).split()]
        assert sum(a != b for a, b in zip(read, digits)) == 1
        slip = rationale("slip", meta, rng)
        assert slip.startswith(f"digits {T.caption(digits)}.") and not slip.endswith(f"={sum(digits)}.")
        fmt = rationale("format_only", meta, rng)
        assert not re.search(r"\d", fmt)
    expr = {"task": "DigitExpr", "digits": [8, 7, 6]}
    assert rationale("faithful", expr, rng) == "digits 8 7 6. 8+7=15. 15*6=90."


def test_teacher_proportions_are_seeded():
    meta = {"task": "DigitExpr", "digits": [1, 2, 3]}
    props = {"faithful": 0.5, "misread": 0.0, "slip": 0.25, "format_only": 0.25}
    a = candidate_rationales(meta, 400, props, random.Random(5))
    b = candidate_rationales(meta, 400, props, random.Random(5))
    assert a == b
    kinds = [k for k, _ in a]
    assert "misread" not in kinds and 0.4 < kinds.count("faithful") / 400 < 0.6
    assert set(kinds) <= set(TYPES)
