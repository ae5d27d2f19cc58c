"""Tiny offline backbones of the real Qwen-VL model classes.

The hub is not always reachable, so the project builds its own small checkpoints: a randomly
initialised Qwen2-VL / Qwen2.5-VL / Qwen3-VL of transformers' own classes, a byte-level BPE
tokenizer trained on a corpus (each digit its own token, as Qwen's pre-tokenizer does), the
processor with a chat template, all saved with ``save_pretrained`` so that
``AutoModelForImageTextToText`` / ``AutoProcessor`` load the folder like any checkpoint.
"""

from __future__ import annotations

import json
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
