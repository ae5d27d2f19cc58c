"""Embedding conventions: mmemb's own and those of released peer checkpoints.

One harness evaluates any of them; each convention says how an item becomes the model's input
text and where the vector is read (facts from the peers' released code and model cards):

  mmemb               the backbone's chat template (system: the instruction; user: images, video,
                      text); the assistant turn is <emb>, or <think> ... </think><emb>; the vector is
                      the last-layer hidden state at <emb>.
  vlm2vec             VLM2Vec-V2 (Qwen2-VL): no chat template; "<|image_pad|> " per image and
                      "<|video_pad|> " for a video, then "instruction text"; the last token.
  qwen3-vl-embedding  the chat template; system: the instruction (a "." added where it lacks closing
                      punctuation; "Represent the user's input." when there is none); user: video,
                      images, text ("NULL" when empty); the generation prompt; the last token.
  ume-r1              the Qwen2-VL chat template with its default system turn; user: images, video,
                      "instruction text\\n<disc_emb>\\n". Direct mode (discriminative): the hidden
                      state at <disc_emb>. Reason mode (generative): UME-R1's instruction to think
                      is added, the model writes until <gen_emb>, and the vector is the hidden state
                      at <gen_emb> (at the last written token where it never writes one).

Every vector is L2-normalised. ``detect_protocol`` reads a checkpoint folder's tokenizer files
(<emb> -> mmemb, <disc_emb> -> ume-r1, Qwen3-VL-Embedding's default system message ->
qwen3-vl-embedding); VLM2Vec-V2 folders look like plain Qwen2-VL and are named explicitly.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..items import Item, ItemError
from .prompts import EMB, render_prompt

PROTOCOLS = ("mmemb", "vlm2vec", "qwen3-vl-embedding", "ume-r1")

DISC_EMB, GEN_EMB = "<disc_emb>", "<gen_emb>"
QWEN3_VL_EMBEDDING_INSTRUCTION = "Represent the user's input."
UME_R1_THINK_PROMPT = ("Represent the above input text, images, videos, or any combination of the three as "
                       "embeddings. \nFirst output the thinking process in <think> </think> tags and then "
                       "summarize the entire input in a word or sentence. \nFinally, use the <gen_emb> tag to "
                       "represent the entire input.")


@dataclass(frozen=True)
class Protocol:
    """How items become prompts and where their vectors are read.

    A peer's vector is at the last occurrence of ``token`` in its prompt (the last prompt token
    where there is none); in reason mode, at ``gen_token`` in what the model writes. mmemb's own
    convention is the embedder's (<emb>, reasoning on the cache).
    """

    name: str
    token: str | None = None
    gen_token: str | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        """The encode modes the convention has."""
        if self.name == "mmemb":
            return ("direct", "reason", "auto")
        return ("direct", "reason") if self.gen_token else ("direct",)

    def resolve_mode(self, mode: str) -> str:
        """The mode to run: ``auto`` on a convention without a think / no-think decision is direct
        (so the default mode works on every checkpoint); a mode the convention lacks is an error."""
        if mode == "auto" and mode not in self.modes:
            return "direct"
        if mode not in self.modes:
            raise ValueError(f"the {self.name} convention has modes {', '.join(self.modes)}, not {mode!r}")
        return mode

    def render(self, processor: Any, item: Item, mode: str = "direct") -> str:
        if self.name == "mmemb":
            return render_prompt(processor, item)
        if self.name == "vlm2vec":
            return _vlm2vec_text(item)
        messages = _qwen3_vl_embedding_messages(item) if self.name == "qwen3-vl-embedding" else \
            _ume_r1_messages(item, generative=mode == "reason")
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_BY_NAME = {
    "mmemb": Protocol("mmemb"),
    "vlm2vec": Protocol("vlm2vec"),
    "qwen3-vl-embedding": Protocol("qwen3-vl-embedding"),
    "ume-r1": Protocol("ume-r1", DISC_EMB, GEN_EMB),
}


def get_protocol(name: str) -> Protocol:
    if name not in _BY_NAME:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)} (or auto)")
    return _BY_NAME[name]


def detect_protocol(folder: str | Path) -> Protocol:
    """The convention of a checkpoint folder, from its tokenizer and chat-template files."""
    folder = Path(folder)
    tokens: set[str] = set()
    texts: list[str] = []
    for name in ("tokenizer_config.json", "added_tokens.json", "chat_template.json"):
        path = folder / name
        if path.is_file():
            spec = json.loads(path.read_text(encoding="utf-8"))
            tokens |= {t["content"] for t in spec.get("added_tokens_decoder", {}).values()}
            tokens |= set(spec) if name == "added_tokens.json" else set()
            texts.append(str(spec.get("chat_template", "")))
    if (folder / "tokenizer.json").is_file():  # transformers 5 keeps added tokens here, before the model
        head = (folder / "tokenizer.json").read_text(encoding="utf-8").split('"model"', 1)[0]
        tokens |= {t for t in (EMB, DISC_EMB) if json.dumps(t) in head}
    if (folder / "chat_template.jinja").is_file():
        texts.append((folder / "chat_template.jinja").read_text(encoding="utf-8"))
    if EMB in tokens:
        return _BY_NAME["mmemb"]
    if DISC_EMB in tokens:
        return _BY_NAME["ume-r1"]
    if any(QWEN3_VL_EMBEDDING_INSTRUCTION.replace("'", "\\'") in t or QWEN3_VL_EMBEDDING_INSTRUCTION in t
           for t in texts):
        return _BY_NAME["qwen3-vl-embedding"]
    return _BY_NAME["mmemb"]  # a base checkpoint: mmemb adds its tokens


# ---- the peers' inputs ---------------------------------------------------------------------------
def _joined(item: Item) -> str:
    return " ".join(part for part in (item.instruction, item.text) if part)


def _vlm2vec_text(item: Item) -> str:
    prefix = "<|image_pad|> " * len(item.images) + ("<|video_pad|> " if item.video else "")
    body = _joined(item)
    if not (prefix or body):
        raise ItemError(None, item.id, "item has neither text nor images")
    return prefix + body


def _vision_content(item: Item, video_first: bool) -> list[dict[str, Any]]:
    images = [{"type": "image"} for _ in item.images]
    video = [{"type": "video"}] if item.video else []
    return video + images if video_first else images + video


def _qwen3_vl_embedding_messages(item: Item) -> list[dict[str, Any]]:
    instruction = (item.instruction or "").strip() or QWEN3_VL_EMBEDDING_INSTRUCTION
    if not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    content = _vision_content(item, video_first=True)
    if item.text or not content:
        content.append({"type": "text", "text": item.text or "NULL"})
    return [{"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": content}]


def _ume_r1_messages(item: Item, generative: bool) -> list[dict[str, Any]]:
    text = f"{_joined(item)}\n{DISC_EMB}\n" + (UME_R1_THINK_PROMPT if generative else "")
    return [{"role": "user", "content": [*_vision_content(item, video_first=False), {"type": "text", "text": text}]}]


# ---- the peers' vectors --------------------------------------------------------------------------
@dataclass
class PeerVectors:
    vectors: Any  # (B, D) float32, L2-normalised
    mask: Any  # (B, L) the prompt's attention mask
    written: list[list[int]] | None  # reason mode: the token ids each row wrote (up to the embedding token)


def peer_vectors(backbone: Any, protocol: Protocol, prompts: list[str], visuals: list, mode: str,
                 max_new_tokens: int) -> PeerVectors:
    """One batch of a peer's vectors, by its pooling rule (see the module docstring)."""
    import torch

    from .teacher_forcing import append_tails

    bb, tok = backbone, backbone.tokenizer
    inputs = bb.prepare(prompts, visuals)
    mask = inputs["attention_mask"]
    written = None
    token = protocol.token
    if mode == "reason":
        written = _generate(bb, inputs, tok.convert_tokens_to_ids(protocol.gen_token), max_new_tokens)
        inputs = append_tails(inputs, written, tok.pad_token_id)
        token = None  # the last position is the embedding token (or the last token written)
    positions, _ = bb.rope_positions(inputs)
    hidden = bb(inputs, positions).hidden
    at = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    if token is not None:
        ids = inputs["input_ids"] == tok.convert_tokens_to_ids(token)
        found = ids.any(dim=1)
        last = hidden.shape[1] - 1 - ids.flip(1).long().argmax(dim=1)
        at = torch.where(found, last, at)  # UME-R1 reads the last position where the token is missing
    vectors = torch.nn.functional.normalize(hidden[torch.arange(hidden.shape[0]), at].float(), dim=-1)
    return PeerVectors(vectors, mask, written)


def _generate(bb: Any, inputs: dict, stop_token: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy writing per row, kept up to and including ``stop_token`` (or up to the end of the turn)."""
    from .backbone import MODEL_INPUT_KEYS

    kwargs = {k: v for k, v in inputs.items() if k in MODEL_INPUT_KEYS}
    out = bb.hf_model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
    ends = {stop_token, bb.tokenizer.pad_token_id, bb.tokenizer.eos_token_id,
            bb.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    rows = []
    for seq in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((k for k, t in enumerate(seq) if t in ends), len(seq))
        rows.append(seq[:cut + 1] if cut < len(seq) and seq[cut] == stop_token else seq[:cut])
    return rows
