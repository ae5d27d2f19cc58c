"""Backbones: tiny offline builds load with the Auto classes; protocol tokens; hub errors; video."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mmemb import Embedder, Item
from mmemb.model.backbone import BackboneNotFound, load_backbone
from mmemb.model.prompts import render_prompt

from .conftest import ARCHES, random_image


@pytest.mark.parametrize("arch", ARCHES)
def test_tiny_loads_with_auto_classes(tiny_paths, arch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_paths[arch])
    processor = AutoProcessor.from_pretrained(tiny_paths[arch])
    assert model.config.model_type == arch
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 1_500_000
    ids = processor.tokenizer("digits 8 7 6. 8+7=15.").input_ids
    digits = [processor.tokenizer.decode([i]) for i in ids if processor.tokenizer.decode([i]).isdigit()]
    assert digits == ["8", "7", "6", "8", "7", "1", "5"]  # each digit its own token


@pytest.mark.parametrize("arch", ARCHES)
def test_protocol_tokens_added_with_mean_rows(tiny_paths, arch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    raw_model = AutoModelForImageTextToText.from_pretrained(tiny_paths[arch])
    raw_tok = AutoProcessor.from_pretrained(tiny_paths[arch]).tokenizer
    had_think = "<think>" in raw_tok.get_vocab()
    assert had_think == (arch == "qwen3_vl")  # the Qwen2 tiny tokenizers lack them, like the real ones
    bb = load_backbone(tiny_paths[arch])
    old = raw_model.get_input_embeddings().weight
    new = bb.hf_model.get_input_embeddings().weight
    mean = old[: len(raw_tok)].mean(0)
    added = [bb.ids.emb] + ([] if had_think else [bb.ids.think, bb.ids.end_think])
    for i in added:
        assert torch.allclose(new[i], mean, atol=1e-6)
    assert torch.equal(new[: len(raw_tok)], old[: len(raw_tok)])
    assert bb.tokenizer.padding_side == "left"


def test_hub_name_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneNotFound, match="--local-dir"):
        load_backbone("Qwen/Qwen3-VL-4B-Instruct")
    assert time.perf_counter() - start < 5
    with pytest.raises(BackboneNotFound, match="no model folder"):
        load_backbone("/does/not/exist")


def test_pixel_options_change_image_tokens(tiny_path):
    img = random_image(np.random.default_rng(0), 64, 64)
    small = Embedder.from_pretrained(tiny_path, max_pixels=16 * 16 * 4)
    large = Embedder.from_pretrained(tiny_path, min_pixels=16 * 16 * 64)
    a = small.encode([Item(images=[img])], mode="direct").prompt_tokens[0]
    b = large.encode([Item(images=[img])], mode="direct").prompt_tokens[0]
    assert a < b


def test_pickled_weights_are_refused(tiny_path, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_path, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_backbone(folder)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_video_items(embedders, arch):
    e = embedders[arch]
    rng = np.random.default_rng(3)
    video = Item(text="what happens", video=[random_image(rng, 32, 32) for _ in range(8)])
    items = [video, Item(text="plain text"), Item(images=[random_image(rng)], text="an image")]
    batched = e.encode(items, mode="direct")
    alone = e.encode([video], mode="direct")
    assert np.abs(batched.embeddings[0] - alone.embeddings[0]).max() <= 1e-4
    assert batched.prompt_tokens[0] > batched.prompt_tokens[1]
    bb = e.backbone
    # Reference: the HF model's own forward (its own M-RoPE positions) over prompt + <emb>.
    inputs = bb.prepare([render_prompt(bb.processor, video) + "<emb>"], [([], video.video)])
    with torch.no_grad():
        ref = bb.hf_model.model(**inputs).last_hidden_state[0, -1]
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert np.abs(alone.embeddings[0] - ref).max() <= 1e-4
