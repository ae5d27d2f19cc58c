"""The public surface on tiny random-weight models built from released Qwen-VL files: the real
tokenizer, vocabulary (151,936 rows), special tokens, processor and chat template of
Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct and Qwen3-VL-4B-Instruct, with a 2-layer, 32-wide
model of each release's config (tests/assets/qwen-vl/SOURCES.md says where every file is from)."""

from __future__ import annotations

import copy
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from mmemb import Embedder, Item
from mmemb.items import image_to_data_url, load_visuals
from mmemb.model.backbone import add_protocol_tokens, load_backbone
from mmemb.model.prompts import DEFAULT_INSTRUCTION, EMB, END_THINK, THINK, render_prompt

from .conftest import RELEASE_ASSETS, RELEASES, random_image
from .train_helpers import write_pairs

ARCHS = tuple(RELEASES)
# The released tokenizers' sizes (ids 0 .. n-1) before mmemb adds anything.
RELEASED_LEN = {"qwen2_vl": 151657, "qwen2_5_vl": 151665, "qwen3_vl": 151669}


def items(rng: np.random.Generator) -> list[Item]:
    return [
        Item(text="What is the sum of the digits?", images=[random_image(rng, 16, 48)],
             instruction="Represent the given image with the following question:"),
        Item(text="3 7 1", instruction="Represent the given caption."),
        Item(text="two images", images=[random_image(rng, 32, 64), random_image(rng, 40, 24)]),
        Item(text="a clip", video=[random_image(rng, 32, 32) for _ in range(4)]),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_released_tokenizer_kept_and_emb_added_once(released_embedders, arch):
    bb = released_embedders[arch].backbone
    tok, cfg = bb.tokenizer, bb.config
    added = 1 if arch == "qwen3_vl" else 3
    assert len(tok) == RELEASED_LEN[arch] + added
    assert bb.model.get_input_embeddings().weight.shape[0] == 151936  # the padded rows were used, no resize
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id == 151655
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id == 151656
    if arch == "qwen3_vl":  # the released <think> / </think> are reused, not duplicated
        assert (bb.ids.think, bb.ids.end_think, bb.ids.emb) == (151667, 151668, 151669)
    else:
        assert sorted((bb.ids.think, bb.ids.end_think, bb.ids.emb)) == list(range(RELEASED_LEN[arch], len(tok)))
    assert bb.ids.stop == [151645] and bb.ids.pad == 151643  # <|im_end|>, <|endoftext|>
    # "<think>" in text is the one token; "<emb>" never splits
    assert tok("<think>x</think><emb>", add_special_tokens=False)["input_ids"][0] == bb.ids.think
    assert tok("a<emb>", add_special_tokens=False)["input_ids"][-1] == bb.ids.emb
    assert add_protocol_tokens(bb.model, bb.processor) == []  # nothing left to add


@pytest.mark.parametrize("arch", ARCHS)
def test_released_chat_template_prompts(released_embedders, arch):
    processor = released_embedders[arch].backbone.processor
    rng = np.random.default_rng(0)
    prompt = render_prompt(processor, Item(text="two images", images=[random_image(rng)] * 2,
                                           instruction="Represent the pair."))
    assert prompt.startswith("<|im_start|>system\nRepresent the pair.<|im_end|>\n<|im_start|>user\n")
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert prompt.endswith("two images<|im_end|>\n<|im_start|>assistant\n")
    assert THINK not in prompt and "You are a helpful assistant." not in prompt  # no default system turn
    bare = render_prompt(processor, Item(text="x"))
    assert bare.startswith(f"<|im_start|>system\n{DEFAULT_INSTRUCTION}<|im_end|>\n")
    video = render_prompt(processor, Item(text="v", video=[random_image(rng)] * 2))
    assert "<|vision_start|><|video_pad|><|vision_end|>v<|im_end|>" in video


def test_released_template_openings_with_think_blocks_are_cut(released_embedders):
    """Qwen3 templates open the assistant turn with an empty <think>\\n\\n</think>\\n\\n block (thinking
    off) or with <think>\\n (thinking models): the prompt stops before it, the decision stays the model's."""
    processor = copy.copy(released_embedders["qwen3_vl"].backbone.processor)
    released = processor.chat_template
    opening = "{{- '<|im_start|>assistant\\n' }}"
    assert opening in released
    item = Item(text="3 7 1", instruction="Represent the given caption.")
    expected = render_prompt(released_embedders["qwen3_vl"].backbone.processor, item)
    for block in ("<think>\\n\\n</think>\\n\\n", "<think>\\n"):
        processor.chat_template = released.replace(opening, "{{- '<|im_start|>assistant\\n" + block + "' }}")
        raw = processor.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                            add_generation_prompt=True)
        assert raw.endswith(block.replace("\\n", "\n"))  # the template does insert it
        assert render_prompt(processor, item) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_released_vision_tokens_and_left_padding(released_embedders, arch):
    e = released_embedders[arch]
    bb, rng = e.backbone, np.random.default_rng(1)
    batch = items(rng)
    visuals = [load_visuals(it, e.max_image_pixels) for it in batch]
    inputs = bb.prepare([render_prompt(bb.processor, it) + EMB for it in batch], visuals)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    merge = bb.processor.image_processor.merge_size ** 2
    per_image = (inputs["image_grid_thw"].prod(dim=1) // merge).tolist()
    assert [int((row == 151655).sum()) for row in ids] == [per_image[0], 0, per_image[1] + per_image[2], 0]
    assert int((ids[3] == 151656).sum()) == int(inputs["video_grid_thw"].prod()) // merge
    assert inputs["video_grid_thw"][0, 0] == 2  # 4 frames, 2 per temporal patch
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # left padding
    assert (ids[:, -1] == bb.ids.emb).all()
    together = e.encode(batch, mode="direct").embeddings
    alone = np.concatenate([e.encode([it], mode="direct").embeddings for it in batch])
    np.testing.assert_allclose(together, alone, atol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_released_encode_modes_auto_equals_direct_and_reason(released_embedders, arch):
    e, batch = released_embedders[arch], items(np.random.default_rng(2))[:3]  # video: see the vision-token test
    direct = e.encode(batch, mode="direct")
    reason = e.encode(batch, mode="reason", max_reasoning_tokens=3)
    assert direct.ok.all() and reason.reasoned.all() and (reason.generated_tokens <= 5).all()
    assert np.abs(direct.embeddings - reason.embeddings).max() > 1e-3
    never = e.encode(batch, mode="auto", think_threshold=1.01, max_reasoning_tokens=3)
    always = e.encode(batch, mode="auto", think_threshold=0.0, max_reasoning_tokens=3)
    assert not never.reasoned.any() and always.reasoned.all()
    np.testing.assert_allclose(never.embeddings, direct.embeddings, atol=2e-5)
    np.testing.assert_allclose(always.embeddings, reason.embeddings, atol=2e-5)
    assert always.rationales == reason.rationales
    np.testing.assert_allclose(np.linalg.norm(direct.embeddings, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("released-pairs"), n_class=8, n_sum=4, negatives=1)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])  # mmemb adds three tokens / one (Qwen3 has <think>)
def test_released_train_checkpoint_reloads_with_the_same_vectors(released_paths, pairs, arch, tmp_path):
    from safetensors.torch import load_file

    from mmemb.train.config import load_config
    from mmemb.train.trainer import Trainer

    cfg = load_config(None, [f"model={released_paths[arch]}", f"output_dir={tmp_path}", "batch_size=4",
                             "max_steps=1", "lr=1e-2", "hard_negatives=1", "warmup_steps=0",
                             f"datasets=[{pairs['DigitClass']}, {pairs['DigitSum']}]"])
    trainer = Trainer(cfg)
    folder = trainer.run()
    batch = items(np.random.default_rng(3))[:3]
    in_memory = Embedder(trainer.backbone).encode(batch, mode="direct")
    loaded = Embedder.from_pretrained(str(folder))
    again = loaded.encode(batch, mode="direct")
    np.testing.assert_allclose(again.embeddings, in_memory.embeddings, atol=1e-5)
    np.testing.assert_allclose(again.p_think, in_memory.p_think, atol=1e-5)
    # <emb> (and <think>, </think> where the release lacks them) saved once, reloaded with the same ids
    bb = loaded.backbone
    assert len(bb.tokenizer) == len(trainer.backbone.tokenizer) and bb.ids == trainer.backbone.ids
    saved = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    assert [t["id"] for t in saved if t["content"] in (EMB, THINK, END_THINK)] == \
        sorted((bb.ids.think, bb.ids.end_think, bb.ids.emb))
    assert bb.config.text_config.vocab_size == 151936
    assert bb.processor.chat_template == \
        json.loads((RELEASE_ASSETS / RELEASES[arch] / "chat_template.json").read_text())["chat_template"]
    base, trained = load_file(f"{released_paths[arch]}/model.safetensors"), load_file(f"{folder}/model.safetensors")
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained


def test_released_selection_and_grpo_step(released_paths, released_embedders, minimmeb_small, tmp_path):
    from mmemb.data.pairs import read_pairs
    from mmemb.fileio import read_jsonl
    from mmemb.method.grpo import RLConfig, run_rl
    from mmemb.method.rationales import load_rationales, run_rationales
    from mmemb.method.selection import SelectionConfig, select
    from mmemb.method.teachers import make_teacher

    e = released_embedders["qwen2_5_vl"]
    chosen = [p for p in read_pairs(minimmeb_small) if p.dataset == "DigitSum"][:3]
    run_rationales(chosen, [make_teacher("minimmeb")], 2, tmp_path / "r.jsonl", show_progress=False)
    select(e, chosen, load_rationales(tmp_path / "r.jsonl"), tmp_path / "sel.jsonl",
           SelectionConfig(sampled_negatives=2, queries_per_batch=3, margin=0.0), show_progress=False)
    rows = read_jsonl(tmp_path / "sel.jsonl")
    assert len(rows) == 3 and all(r["label"] in ("reason", "direct") and len(r["candidates"]) == 2 for r in rows)

    cfg = RLConfig(model=released_paths["qwen2_5_vl"], out=str(tmp_path / "rl"), steps=1, queries_per_step=2,
                   group_size=2, max_reasoning_tokens=3, save_every=1, seed=0,
                   data=[str(minimmeb_small / "train" / "DigitSum.jsonl")])
    final = run_rl(cfg, show_progress=False)
    log = read_jsonl(tmp_path / "rl" / "log.jsonl")
    assert [r["step"] for r in log] == [1] and np.isfinite(log[0]["reward"])
    assert len(load_backbone(final).tokenizer) == len(e.backbone.tokenizer)


def test_released_eval_on_a_minimmeb_task(released_embedders, minimmeb_small, tmp_path):
    from mmemb.eval.runner import evaluate

    summary = evaluate(released_embedders["qwen3_vl"], "DigitClass", tmp_path / "run", mode="auto",
                       data=str(minimmeb_small), max_reasoning_tokens=2, show_progress=False,
                       cache_dir=str(tmp_path / "cache"))
    score = json.loads((tmp_path / "run" / "DigitClass" / "score.json").read_text())
    assert score["num_queries"] == 12 and score["failures"]["count"] == 0
    assert 0.0 <= score["main"] <= 1.0 and summary["overall"]["main"] == score["main"]


def test_released_server_returns_the_vectors_of_encode(released_embedders):
    from mmemb.serve import ServeSettings, create_app, serve_in_thread

    e = released_embedders["qwen2_vl"]
    image = Image.fromarray((np.random.default_rng(4).random((24, 40, 3)) * 255).astype("uint8"))
    app = create_app(e, ServeSettings(model_name="released", max_reasoning_tokens=2))
    with serve_in_thread(app) as (url, _):
        body = {"model": "released", "input": ["3 7 1", {"text": "sum?", "image": image_to_data_url(image)}]}
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want = e.encode(["3 7 1", Item(text="sum?", images=[image])], mode="auto", max_reasoning_tokens=2).embeddings
    np.testing.assert_allclose(got, want, atol=1e-4)
