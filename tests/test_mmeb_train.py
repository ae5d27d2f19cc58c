"""MMEB-train rows become Pair JSONL that the trainer reads."""

from __future__ import annotations

import pandas as pd

from mmemb.data.mmeb_train import convert_mmeb_train, split_instruction
from mmemb.data.pairs import read_pairs


def test_split_instruction():
    assert split_instruction("<|image_1|> Represent the given image with the following question: What is it?") == (
        "Represent the given image with the following question:", "What is it?")
    assert split_instruction("<|image_1|> Represent the given image for classification") == (
        "Represent the given image for classification", None)
    assert split_instruction("tench") == ("tench", None)
    assert split_instruction("") == (None, None)


def test_convert(tmp_path):
    folder = tmp_path / "mmeb-train" / "OK-VQA"
    folder.mkdir(parents=True)
    pd.DataFrame([
        {"qry": "<|image_1|> Represent the given image with the following question: What sport is this?",
         "qry_image_path": "images/OK-VQA/1.jpg", "pos_text": "Represent the given text answer: tennis",
         "pos_image_path": "", "neg_text": "Represent the given text answer: golf", "neg_image_path": ""},
        {"qry": "", "qry_image_path": "", "pos_text": "x", "pos_image_path": "", "neg_text": "", "neg_image_path": ""},
    ]).to_parquet(folder / "original-00000-of-00001.parquet")
    counts = convert_mmeb_train(tmp_path / "mmeb-train", tmp_path / "img", tmp_path / "pairs")
    assert counts == {"OK-VQA": 1}  # the row with an empty query is dropped
    (pair,) = read_pairs(tmp_path / "pairs" / "OK-VQA.jsonl")
    assert pair.query.instruction == "Represent the given image with the following question:"
    assert pair.query.text == "What sport is this?"
    assert pair.query.images == [str((tmp_path / "img").resolve() / "images/OK-VQA/1.jpg")]
    assert pair.positive.text == "tennis" and pair.negatives[0].text == "golf" and pair.dataset == "OK-VQA"
