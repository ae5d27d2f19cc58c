"""Shared fixtures: tiny offline backbones, built once per test run."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from mmemb.data.minimmeb import tokenizer_corpus
    from mmemb.model.tiny import build_tiny_backbone

    root = tmp_path_factory.mktemp("backbones")
    corpus = tokenizer_corpus()
    return {arch: str(build_tiny_backbone(arch, root / arch, corpus=corpus, seed=1)) for arch in ARCHES}


@pytest.fixture(scope="session")
def tiny_path(tiny_paths):
    """The default architecture (Qwen3-VL, the paper's backbone family)."""
    return tiny_paths["qwen3_vl"]


@pytest.fixture(scope="session")
def embedders(tiny_paths):
    from mmemb import Embedder

    return {arch: Embedder.from_pretrained(path) for arch, path in tiny_paths.items()}


def random_image(rng: np.random.Generator, height: int = 16, width: int = 32):
    from PIL import Image

    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture
def mixed_items():
    """Items with and without images, images of different sizes, several images in one item."""
    from mmemb import Item

    rng = np.random.default_rng(0)
    return [
        Item(text="What is the sum of the digits?", images=[random_image(rng, 16, 48)],
             instruction="Represent the given image with the following question:"),
        Item(text="3 7 1", instruction="Represent the given caption."),
        Item(images=[random_image(rng, 16, 16)], instruction="Represent the given image for classification."),
        Item(text="two images", images=[random_image(rng, 32, 64), random_image(rng, 16, 32)]),
        Item(text="a much longer text query with several words in it, to pad the others"),
        Item(images=[random_image(rng, 48, 16)]),
    ]


@pytest.fixture(scope="session")
def minimmeb_small(tmp_path_factory):
    """A small MiniMMEB build (all tasks, few pairs) shared by the tests."""
    from mmemb.data.minimmeb import BuildConfig, build

    return build(tmp_path_factory.mktemp("minimmeb") / "mm", BuildConfig(seed=7, train_pairs=240, val_queries=4,
                                                                        test_queries=12))
