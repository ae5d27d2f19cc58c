"""Peers' released checkpoints evaluated with their own conventions (mmemb.model.protocols), each on
a tiny model saved in that peer's layout: VLM2Vec-V2 (a plain Qwen2-VL folder), Qwen3-VL-Embedding
(its released tokenizer and chat template), UME-R1 (Qwen2-VL with <disc_emb> / <gen_emb>). Every
vector is checked against the model's own forward pass on the peer's prompt, one item at a time."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmemb import Embedder, Item
from mmemb.cli import app
from mmemb.model.protocols import DISC_EMB, GEN_EMB, detect_protocol

from .conftest import build_released, random_image


@pytest.fixture(scope="module")
def peer_paths(released_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    ume = root / "ume-r1"
    shutil.copytree(released_paths["qwen2_vl"], ume)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ume)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [DISC_EMB, GEN_EMB]},
                                           replace_extra_special_tokens=False)
    processor.save_pretrained(ume)  # UME-R1's tokenizer: Qwen2-VL's plus its two embedding tokens
    return {"vlm2vec": released_paths["qwen2_vl"], "ume-r1": str(ume),
            "qwen3-vl-embedding": build_released("Qwen3-VL-Embedding-8B", root / "qwen3-vl-embedding")}


def reference(embedder: Embedder, prompt: str, item: Item, at: int | None = None, tail: list[int] = ()) -> np.ndarray:
    """The model's own forward (its own positions) on one prompt: the last-layer state at ``at``."""
    bb = embedder.backbone
    kwargs = {"images": [np.asarray(i) for i in item.images]} if item.images else {}
    inputs = bb.processor(text=[prompt], return_tensors="pt", **kwargs)
    if tail:
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tail])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(tail)))
    with torch.no_grad():
        hidden = bb.core(**inputs).last_hidden_state[0]
    vec = hidden[-1 if at is None else at].float()
    return torch.nn.functional.normalize(vec, dim=-1).numpy()


def items():
    rng = np.random.default_rng(0)
    return [Item(text="What is in the picture?", images=[random_image(rng, 32, 56)],
                 instruction="Represent the given image with the following question:"),
            Item(text="3 7 1", instruction="Represent the given caption")]


def test_conventions_read_from_the_folder(peer_paths, released_paths):
    assert detect_protocol(peer_paths["qwen3-vl-embedding"]).name == "qwen3-vl-embedding"
    assert detect_protocol(peer_paths["ume-r1"]).name == "ume-r1"
    assert detect_protocol(released_paths["qwen2_vl"]).name == "mmemb"  # a base model: mmemb adds its tokens


def test_vlm2vec_last_token_of_its_plain_prompt(peer_paths):
    e = Embedder.from_pretrained(peer_paths["vlm2vec"], protocol="vlm2vec")
    assert len(e.backbone.tokenizer) == 151657  # the released tokenizer, nothing added
    batch = items()
    prompts = [e.protocol.render(e.backbone.processor, it) for it in batch]
    assert prompts == ["<|image_pad|> Represent the given image with the following question: What is in the picture?",
                       "Represent the given caption 3 7 1"]
    got = e.encode(batch).embeddings  # one left-padded batch
    for k, it in enumerate(batch):
        np.testing.assert_allclose(got[k], reference(e, prompts[k], it), atol=1e-4)
    # No think / no-think decision: auto (the default policy) is direct; reason is refused.
    np.testing.assert_array_equal(e.encode(batch, mode="auto").embeddings, got)
    with pytest.raises(ValueError, match="vlm2vec convention has modes direct"):
        e.encode(batch, mode="reason")


def test_qwen3_vl_embedding_last_token_of_its_chat_prompt(peer_paths):
    e = Embedder.from_pretrained(peer_paths["qwen3-vl-embedding"])  # convention read from the folder
    assert e.protocol.name == "qwen3-vl-embedding" and len(e.backbone.tokenizer) == 151669
    batch = items()
    prompts = [e.protocol.render(e.backbone.processor, it) for it in batch]
    assert prompts[1] == ("<|im_start|>system\nRepresent the given caption.<|im_end|>\n"  # "." added
                          "<|im_start|>user\n3 7 1<|im_end|>\n<|im_start|>assistant\n")
    assert "system\nRepresent the given image with the following question:<|im_end|>" in prompts[0]
    assert e.protocol.render(e.backbone.processor, Item(text="x")).startswith(
        "<|im_start|>system\nRepresent the user's input.<|im_end|>")
    got = e.encode(batch).embeddings
    for k, it in enumerate(batch):
        np.testing.assert_allclose(got[k], reference(e, prompts[k], it), atol=1e-4)


def test_ume_r1_disc_and_gen_embeddings(peer_paths):
    e = Embedder.from_pretrained(peer_paths["ume-r1"])
    tok = e.backbone.tokenizer
    disc = tok.convert_tokens_to_ids(DISC_EMB)
    batch = items()
    prompts = [e.protocol.render(e.backbone.processor, it) for it in batch]
    assert prompts[1] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                          "Represent the given caption 3 7 1\n<disc_emb>\n<|im_end|>\n<|im_start|>assistant\n")
    direct = e.encode(batch, mode="direct")
    for k, it in enumerate(batch):
        ids = tok(prompts[k])["input_ids"] if not it.images else None
        at = ids.index(disc) if ids is not None else None
        if at is None:  # with an image the prompt expands: find <disc_emb> in the processed ids
            kwargs = {"images": [np.asarray(i) for i in it.images]}
            ids = e.backbone.processor(text=[prompts[k]], return_tensors="pt", **kwargs)["input_ids"][0].tolist()
            at = ids.index(disc)
        np.testing.assert_allclose(direct.embeddings[k], reference(e, prompts[k], it, at=at), atol=1e-4)

    gen = e.encode(batch, mode="reason", max_reasoning_tokens=3)
    assert gen.reasoned.all() and (gen.generated_tokens <= 3).all()
    gen_prompts = [e.protocol.render(e.backbone.processor, it, "reason") for it in batch]
    assert "use the <gen_emb> tag to represent the entire input." in gen_prompts[0]
    for k, it in enumerate(batch):
        np.testing.assert_allclose(gen.embeddings[k], reference(e, gen_prompts[k], it, tail=gen.rationale_token_ids[k]),
                                   atol=1e-4)


def test_ume_r1_writing_stops_at_gen_emb(peer_paths, monkeypatch):
    from mmemb.model import protocols

    e = Embedder.from_pretrained(peer_paths["ume-r1"])
    tok = e.backbone.tokenizer
    gen, end, pad = tok.convert_tokens_to_ids(GEN_EMB), tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    written = torch.tensor([[7, 7, 11, 12, gen, 13], [7, 7, 21, end, pad, pad], [7, 7, 31, 32, 33, 34]])
    monkeypatch.setattr(e.backbone.hf_model, "generate", lambda **kw: written)
    inputs = {"input_ids": torch.zeros((3, 2), dtype=torch.long)}
    assert protocols._generate(e.backbone, inputs, gen, 4) == [[11, 12, gen], [21], [31, 32, 33, 34]]


def test_eval_with_a_peer_convention(peer_paths, minimmeb_small, tmp_path):
    runs = {}
    for protocol in ("vlm2vec", "mmemb"):
        out = tmp_path / protocol
        result = CliRunner().invoke(app, ["eval", "--model", peer_paths["vlm2vec"], "--protocol", protocol,
                                          "--tasks", "DigitClass", "--data", str(minimmeb_small), "--out", str(out),
                                          "--cache", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        runs[protocol] = json.loads((out / "run.json").read_text())["settings"]["model"]
        assert json.loads((out / "DigitClass" / "score.json").read_text())["num_queries"] == 12
    assert runs["vlm2vec"] != runs["mmemb"]  # a convention's vectors never come from another's cache
    bad = CliRunner().invoke(app, ["eval", "--model", peer_paths["vlm2vec"], "--protocol", "clip", "--tasks",
                                   "DigitClass", "--data", str(minimmeb_small), "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "choose auto or one of mmemb, vlm2vec" in bad.output
