"""Tiny offline backbones of the real Qwen-VL model classes.

The hub is not always reachable, so the project builds its own small checkpoints: a randomly
initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL of transformers' own classes, a byte-level BPE
tokenizer trained on a corpus (each digit its own token, as Qwen's pre-tokenizer does), the
processor with a chat template, all saved with ``save_pretrained`` so that
``AutoModelForImageTextToText`` / ``AutoProcessor`` load the folder like any checkpoint.

:func:`build_from_release` does the same from the files a released checkpoint ships without its
weights (``config.json``, tokenizer, processor and chat-template files): the released tokenizer,
vocabulary, special tokens, processor and template as they are, and a model of the released
config with fewer layers and a smaller hidden size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Qwen's own pre-tokenizer split: letters in words, each digit alone, punctuation runs.
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# A Qwen-style chat template (system/user/assistant turns, vision placeholders).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Sizes: text hidden x layers, vision hidden x layers. "tiny" is the measured sweet spot on
# 2 CPU cores (~0.7 M parameters); "4b" is Qwen3-VL-4B's shape (random weights, for GPU timing).
SIZES = {
    "tiny": dict(text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=384,
                 vision_hidden=64, vision_layers=2, vision_heads=4, vision_ffn=128, patch=8),
    "small": dict(text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_ffn=768,
                  vision_hidden=128, vision_layers=2, vision_heads=4, vision_ffn=256, patch=8),
    "4b": dict(text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_ffn=9728,
               vision_hidden=1024, vision_layers=24, vision_heads=16, vision_ffn=4096, patch=16),
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 640, think_tokens: bool = True):
    """A byte-level BPE tokenizer in Qwen's format (``Qwen2Tokenizer``) trained on ``corpus``."""
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    qwen_tok = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges)
    qwen_tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    if think_tokens:  # like Qwen3 tokenizers: <think> / </think> exist but are not special
        qwen_tok.add_tokens(["<think>", "</think>"])
    qwen_tok.padding_side = "left"
    return qwen_tok


def build_tiny_backbone(
    arch: str,
    out: str | Path,
    *,
    corpus: Iterable[str],
    size: str = "tiny",
    vocab_size: int = 640,
    seed: int = 0,
) -> Path:
    """Build, save and return the folder of a randomly initialised backbone of ``arch``.

    The tokenizer is trained on ``corpus`` (MiniMMEB's: :func:`mmemb.data.minimmeb.tokenizer_corpus`).
    """
    from transformers import Qwen2VLImageProcessor

    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    out = Path(out)
    torch.manual_seed(seed)

    tokenizer = train_tokenizer(corpus, vocab_size,
                                think_tokens=arch == "qwen3_vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_SPECIALS}
    factor = s["patch"] * 2
    pixels = dict(size={"shortest_edge": factor * factor, "longest_edge": factor * factor * 256})
    image_processor = Qwen2VLImageProcessor(patch_size=s["patch"], merge_size=2, temporal_patch_size=2, **pixels)
    config = _config(arch, s, len(tokenizer), tokenizer.pad_token_id, ids)

    model_cls, processor_cls, video_cls = _classes(arch)
    model = model_cls(config)
    video_processor = video_cls(patch_size=s["patch"], merge_size=2, temporal_patch_size=2,
                                size={"shortest_edge": factor * factor, "longest_edge": factor * factor * 2048})
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _config(arch: str, s: dict, vocab: int, pad_id: int, ids: dict[str, int]):
    head_dim = s["text_hidden"] // s["text_heads"]
    half = head_dim // 2
    common_text = dict(
        vocab_size=vocab, hidden_size=s["text_hidden"], intermediate_size=s["text_ffn"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], max_position_embeddings=8192, pad_token_id=pad_id,
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    vis = dict(depth=s["vision_layers"], num_heads=s["vision_heads"], patch_size=s["patch"],
               spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig

        hw = half * 5 // 16  # interleaved M-RoPE sections in the real model's 24:20:20 proportion
        section = [half - 2 * hw, hw, hw]
        text = dict(common_text, head_dim=head_dim, tie_word_embeddings=True, rope_parameters={
            "rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": section, "mrope_interleaved": True})
        vision = dict(vis, hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"],
                      out_hidden_size=s["text_hidden"],
                      num_position_embeddings=64 if s["vision_hidden"] < 1024 else 2304,
                      deepstack_visual_indexes=[0] if s["vision_layers"] < 8 else [5, 11, 17])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section}
    common_text.update(bos_token_id=None, eos_token_id=ids["<|im_end|>"])
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(vis, embed_dim=s["vision_hidden"], hidden_size=s["text_hidden"],
                      mlp_ratio=s["vision_ffn"] // s["vision_hidden"])
        return Qwen2VLConfig(text_config=dict(common_text, rope_parameters=rope), vision_config=vision, **tokens)
    from transformers import Qwen2_5_VLConfig

    vision = dict(vis, hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"],
                  out_hidden_size=s["text_hidden"], window_size=s["patch"] * 8,
                  fullatt_block_indexes=[s["vision_layers"] - 1])
    return Qwen2_5_VLConfig(text_config=dict(common_text, rope_parameters=rope), vision_config=vision, **tokens)


def _classes(arch: str):
    if arch == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        return Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if arch == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        return Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor


# ---- from a released checkpoint's files -------------------------------------------------------
# The shape a released config is shrunk to: two layers each side, 32 wide (151,936 x 32 embeddings).
RELEASE_TINY = dict(text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_ffn=64,
                    vision_hidden=32, vision_layers=2, vision_heads=2, vision_ffn=64)


def shrink_release_config(config: dict, s: dict = RELEASE_TINY) -> dict:
    """A released ``config.json`` with fewer layers and a smaller hidden size.

    Vocabulary size, token ids, RoPE type and theta, patch / merge sizes and the vision layout
    stay as released. Where the head size follows from the hidden size (Qwen2-VL, Qwen2.5-VL),
    the M-RoPE sections are scaled to the smaller head in the released proportions; Qwen3-VL
    keeps its explicit head size and its sections.
    """
    cfg = json.loads(json.dumps(config))
    kind = cfg.get("model_type")
    if kind not in ARCHES:
        raise ValueError(f"model_type {kind!r} is not one of {', '.join(ARCHES)}")
    text = cfg.get("text_config") or cfg  # Qwen2(.5)-VL releases keep the text fields at the top level
    text.update(hidden_size=s["text_hidden"], num_hidden_layers=s["text_layers"], intermediate_size=s["text_ffn"],
                num_attention_heads=s["text_heads"], num_key_value_heads=s["text_kv_heads"])
    if "max_window_layers" in text:
        text["max_window_layers"] = s["text_layers"]
    if "head_dim" not in text:
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        if "mrope_section" in rope:
            rope["mrope_section"] = _scaled_sections(rope["mrope_section"], s["text_hidden"] // s["text_heads"] // 2)
    vis = cfg["vision_config"]
    vis.update(depth=s["vision_layers"], num_heads=s["vision_heads"])
    if kind == "qwen2_vl":
        vis.update(embed_dim=s["vision_hidden"], mlp_ratio=s["vision_ffn"] // s["vision_hidden"],
                   hidden_size=s["text_hidden"])
    else:
        vis.update(hidden_size=s["vision_hidden"], intermediate_size=s["vision_ffn"], out_hidden_size=s["text_hidden"])
    if "fullatt_block_indexes" in vis:
        vis["fullatt_block_indexes"] = [s["vision_layers"] - 1]
    if "deepstack_visual_indexes" in vis:
        vis["deepstack_visual_indexes"] = [0]
    return cfg


def _scaled_sections(sections: list[int], half_head: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) scaled to sum to ``half_head``."""
    total = sum(sections)
    out = [max(1, round(x * half_head / total)) for x in sections[1:]]
    return [half_head - sum(out), *out]


def build_from_release(release: str | Path, out: str | Path, *, extra_files: Iterable[str | Path] = (),
                       seed: int = 0, size: dict = RELEASE_TINY) -> Path:
    """A random-weight checkpoint of a released model's config, shrunk, with its real files.

    ``release`` holds the files a checkpoint ships besides its weights; ``extra_files`` adds
    files kept elsewhere (e.g. a vocabulary shared by several releases). The released generation config, tokenizer, processor and chat template
    are copied as they are; only ``config.json`` is shrunk (:func:`shrink_release_config`).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    release, out = Path(release), Path(out)
    config = shrink_release_config(json.loads((release / "config.json").read_text(encoding="utf-8")), size)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # config.json, generation_config.json (replaced below), weights
    for f in [*sorted(release.iterdir()), *map(Path, extra_files)]:
        if f.name == "config.json" or not f.is_file():
            continue
        shutil.copyfile(f, out / f.name)
    return out
