"""Load a Hugging Face image-text-to-text model and its processor as an embedding backbone.

:class:`Backbone` is one ``nn.Module`` around the HF model: its ``forward`` returns last-layer
hidden states (and next-token logits only where asked), so a trainer can wrap it in DDP/FSDP
and every parameter it touches is used inside one forward. It also owns the protocol's token
ids and the multimodal RoPE positions that continuing on a KV cache needs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import hub_offline
from .prompts import EMB, END_THINK, THINK

# Inputs the processor produces that the model consumes.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                    "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_encoder_outputs")
PIXEL_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class BackboneNotFound(RuntimeError):
    pass


@dataclass
class TokenIds:
    emb: int
    think: int
    end_think: int
    pad: int
    stop: list[int]  # ids that end an assistant turn (e.g. <|im_end|>, eos)
    special: list[int]  # every special/added id: never part of a rationale

    def p_think(self, decision_logits: torch.Tensor) -> torch.Tensor:
        """p(<think>) of the first assistant token, over the two choices <think> / <emb>."""
        return torch.softmax(decision_logits[:, [self.think, self.emb]], dim=-1)[:, 0]


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # (B, L, D) last-layer hidden states (after the final norm)
    logits: torch.Tensor | None  # (N, V) at the requested positions
    cache: Any


class Backbone(nn.Module):
    """An HF image-text-to-text model + processor, with mmemb's special tokens in place."""

    def __init__(self, model: nn.Module, processor: Any, source: str | None = None):
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.source = source

    @functools.cached_property
    def ids(self) -> TokenIds:
        """mmemb's token ids (<emb>, <think>, ...); a peer's checkpoint loaded without them has none."""
        return _token_ids(self.tokenizer)

    # ---- structure -------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The ForConditionalGeneration model (under a peft wrapper if there is one)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def core(self) -> nn.Module:
        """The vision-language model without the LM head (visual + language_model)."""
        return self.hf_model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.hf_model.lm_head

    @property
    def config(self):
        return self.hf_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # not lm_head.weight: behind peft's trainable-token wrapper that weight is computed, which
        # fails on FSDP's sharded parameters outside a forward
        return self.hf_model.dtype

    # ---- computation -----------------------------------------------------------------------
    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        position_ids: torch.Tensor,
        cache: Any = None,
        logits_index: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BackboneOutput:
        """Run the model; return hidden states and logits at ``logits_index`` (rows, positions).

        ``position_ids`` are always given explicitly (3, B, L): the model's own inference of
        positions ignores left padding for text-only batches and forgets the RoPE offsets of
        images when it continues on a cache.
        """
        kwargs = {k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS and v is not None}
        if cache is not None:
            kwargs["past_key_values"] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        out = self.core(position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = None
        if logits_index is not None:
            logits = at_least_fp32(self.lm_head(hidden[logits_index[0], logits_index[1]]))
        return BackboneOutput(hidden=hidden, logits=logits, cache=out.past_key_values if cache is not None else None)

    def prepare(self, texts: list[str], visuals: list[tuple[list[Any], list[Any] | None]]) -> dict[str, torch.Tensor]:
        """Tokenize rendered texts with their loaded images / video frames into a left-padded batch."""
        images = [im for ims, _ in visuals for im in ims]
        videos = [frames for _, frames in visuals if frames is not None]
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            # Frames arrive already sampled; give the timing the Qwen3-VL processor asks for.
            kwargs["video_metadata"] = [{"fps": 1.0, "total_num_frames": len(v), "frames_indices": list(range(len(v)))}
                                        for v in videos]
            kwargs["do_sample_frames"] = False
            kwargs["cap_pixels_per_frame"] = True  # qwen-vl-utils' per-frame pixel cap
        batch = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        device, dtype = self.device, self.dtype
        out = {}
        for k, v in batch.items():
            if not isinstance(v, torch.Tensor):
                continue
            # One copy: cast and move together (pixels are float32 from the processor).
            out[k] = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        return out

    def encode_visuals(self, inputs: dict[str, torch.Tensor]) -> dict[str, object]:
        """Run the vision tower once; the outputs go to the model as ``mm_encoder_outputs`` (and to
        a gate) in place of the pixels, which are removed from ``inputs``."""
        core, out = self.core, {}
        for kind, (pixels, grid) in PIXEL_KEYS.items():
            if inputs.get(pixels) is not None:
                getter = core.get_image_features if kind == "image" else core.get_video_features
                out[kind] = getter(inputs.pop(pixels), inputs[grid], return_dict=True)
        if out:
            inputs["mm_encoder_outputs"] = out
        return out

    def layer0_embeddings(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the first decoder layer reads: token embeddings, vision features in place of their
        placeholder tokens (``inputs`` must hold ``mm_encoder_outputs``, see :meth:`encode_visuals`)."""
        ids = inputs["input_ids"]
        embeds = self.core.get_input_embeddings()(ids)
        for kind, encoded in inputs.get("mm_encoder_outputs", {}).items():
            feats = torch.cat(list(encoded.pooler_output), dim=0).to(embeds.dtype)
            token = self.config.image_token_id if kind == "image" else self.config.video_token_id
            embeds = embeds.masked_scatter((ids == token).unsqueeze(-1), feats)
        return embeds

    @torch.no_grad()
    def rope_positions(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimodal RoPE positions (3, B, L) for a left-padded batch, and each row's next position.

        Text-only rows count real tokens (the model's own per-row loop is only needed, and only
        run, for rows that hold images or video).
        """
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        token_types = inputs.get("mm_token_type_ids")
        positions = (mask.long().cumsum(1) - 1).clamp(min=0).masked_fill(mask == 0, 0)
        positions = positions.unsqueeze(0).repeat(3, 1, 1)
        if token_types is not None and token_types.any():
            rows = torch.nonzero(token_types.any(1)).flatten()  # grids are listed in row order
            kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                      if inputs.get(k) is not None}
            vision_pos, _ = self.core.get_rope_index(ids[rows], mm_token_type_ids=token_types[rows],
                                                     attention_mask=mask[rows], **kwargs)
            positions[:, rows] = vision_pos.to(positions.dtype)
        next_pos = positions.masked_fill(~mask.bool().unsqueeze(0), -1).amax(dim=(0, 2)) + 1
        return positions, next_pos

    def save_pretrained(self, out: str | Path, **kwargs) -> None:
        self.model.save_pretrained(out, safe_serialization=True, **kwargs)
        self.processor.save_pretrained(out)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to float32; float64 stays (exactness tests run the model in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _token_ids(tokenizer) -> TokenIds:
    def tid(tok: str) -> int:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id and tok != tokenizer.unk_token:
            raise ValueError(f"tokenizer has no {tok!r} token; load the model with load_backbone()")
        return i

    stop = [i for i in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} if isinstance(i, int)]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenIds(emb=tid(EMB), think=tid(THINK), end_think=tid(END_THINK), pad=pad, stop=sorted(stop),
                    special=sorted(special))


def add_protocol_tokens(model: nn.Module, processor: Any) -> list[str]:
    """Add <emb> (and <think>, </think> where missing) and initialise their rows to the mean row.

    Returns the tokens that were added. Rows beyond the tokenizer (Qwen pads its vocabulary)
    are reused when there is room; the matrix is resized only when there is not.
    """
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    n_before = len(tok)
    missing = [t for t in (THINK, END_THINK) if t not in vocab]
    added = list(missing)
    if missing:
        tok.add_tokens(missing)
    if EMB not in vocab:
        tok.add_special_tokens({"additional_special_tokens": [EMB]}, replace_extra_special_tokens=False)
        added.append(EMB)
    if not added:
        return []
    emb = model.get_input_embeddings()
    if len(tok) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    new_ids = tok.convert_tokens_to_ids(added)
    with torch.no_grad():
        for matrix in {id(m): m for m in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            matrix[new_ids] = matrix[:n_before].mean(dim=0, keepdim=True).to(matrix.dtype)
    return added


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dev = torch.device(device)
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


def load_backbone(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    add_tokens: bool = True,
) -> Backbone:
    """Load a local checkpoint folder (full model, or a peft adapter over a base) or a hub name.

    Weights are read from safetensors only; remote code runs only when asked for. ``add_tokens``
    adds mmemb's protocol tokens where missing (off for a peer's checkpoint, whose tokenizer
    must stay as released).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file is noise for small checkpoints
    source = _resolve_source(name_or_path)
    if attn_implementation == "auto":
        attn_implementation = "flash_attention_2" if flash_attention_available() else "sdpa"
    if attn_implementation == "flash_attention_2" and not flash_attention_available():
        raise RuntimeError("attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU; "
                           "use 'sdpa' instead")
    torch_dtype = resolve_dtype(dtype, device)
    base = _adapter_base(source)
    is_adapter = base != source
    processor = AutoProcessor.from_pretrained(_tokenizer_source(source, base), trust_remote_code=trust_remote_code)
    if min_pixels is not None or max_pixels is not None:
        for proc in (processor.image_processor, getattr(processor, "video_processor", None)):
            if proc is not None:
                size = dict(proc.size)
                size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v})
                proc.size = type(proc.size)(**size) if not isinstance(proc.size, dict) else size
    model = AutoModelForImageTextToText.from_pretrained(
        base, dtype=torch_dtype, attn_implementation=attn_implementation, use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    if add_tokens and is_adapter:
        # The adapter was trained on the base with the protocol tokens added to the *base*
        # tokenizer: add them the same way (same rows, same mean initialisation), whatever the
        # adapter folder's saved tokenizer already holds.
        base_processor = AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code)
        add_protocol_tokens(model, base_processor)
        if base_processor.tokenizer.get_vocab() != processor.tokenizer.get_vocab():
            raise ValueError(f"{source}: the adapter's tokenizer differs from its base {base!r} plus the protocol tokens")
    elif add_tokens:
        add_protocol_tokens(model, processor)
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source)
    model.to(device).eval()
    return Backbone(model, processor, source=str(name_or_path))


def tokenizer_folder(name_or_path: str | os.PathLike) -> str:
    """Where a checkpoint's tokenizer files are (an adapter folder's own, or its base's)."""
    source = _resolve_source(name_or_path)
    return _tokenizer_source(source, _adapter_base(source))


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint's tokenizer alone (no weights read), found as ``load_backbone`` finds it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder(name_or_path), trust_remote_code=trust_remote_code)


def _adapter_base(source: str) -> str:
    """The base model of a peft adapter folder; ``source`` itself for a full checkpoint."""
    adapter = Path(source) / "adapter_config.json"
    if not adapter.is_file():
        return source
    return _resolve_source(json.loads(adapter.read_text())["base_model_name_or_path"])


def _tokenizer_source(source: str, base: str) -> str:
    return source if (Path(source) / "tokenizer_config.json").exists() else base


def _resolve_source(name_or_path: str | os.PathLike) -> str:
    """A local folder as is; a hub name only if the hub can be reached, else a clear error."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise BackboneNotFound(f"no model folder at {name!r}")
    if hub_offline():
        raise BackboneNotFound(
            f"{name!r} is not a local folder and the Hugging Face hub cannot be reached from here. "
            f"Download it where the hub is reachable (`hf download {name} --local-dir DIR`), copy DIR "
            f"here, and pass that folder instead (e.g. --model DIR)."
        )
    return name
