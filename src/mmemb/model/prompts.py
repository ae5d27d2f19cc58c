"""The token protocol: how an item becomes a chat prompt, and what the assistant turn holds.

    system:    <task instruction>
    user:      <image(s) or video> <text>
    assistant: <emb>                                   direct mode
    assistant: <think> ...reasoning... </think><emb>   reasoning mode

The prompt is rendered with the backbone's own chat template up to the start of the assistant
turn; the first assistant token is the model's decision (<think> or <emb>).
"""

from __future__ import annotations

from typing import Any

from ..items import Item, ItemError

EMB = "<emb>"
THINK = "<think>"
END_THINK = "</think>"

DEFAULT_INSTRUCTION = "Represent the given input."


def chat_messages(item: Item, num_images: int | None = None, has_video: bool | None = None) -> list[dict[str, Any]]:
    """The system + user messages for an item (images first, then text, as MMEB renders them)."""
    num_images = len(item.images) if num_images is None else num_images
    has_video = bool(item.video) if has_video is None else has_video
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    if has_video:
        content.append({"type": "video"})
    if item.text:
        content.append({"type": "text", "text": item.text})
    if not content:
        raise ItemError(None, item.id, "item has neither text nor images")
    return [
        {"role": "system", "content": item.instruction or DEFAULT_INSTRUCTION},
        {"role": "user", "content": content},
    ]


def render_prompt(processor: Any, item: Item) -> str:
    """The chat text up to (and including) the start of the assistant turn.

    Some released templates open the assistant turn with a reasoning block of their own (an
    empty ``<think>\n\n</think>\n\n`` when thinking is off, or ``<think>\n`` on thinking
    models): that part is cut, so the first assistant token stays the model's decision.
    """
    text = processor.apply_chat_template(chat_messages(item), tokenize=False, add_generation_prompt=True)
    opening = generation_prompt(processor)
    if THINK in opening and text.endswith(opening):
        text = text[:len(text) - len(opening) + opening.index(THINK)]
    return text


_GENERATION_PROMPTS: dict[str, str] = {}


def generation_prompt(processor: Any) -> str:
    """What the chat template appends for ``add_generation_prompt`` (e.g. ``<|im_start|>assistant\n``)."""
    template = processor.chat_template if isinstance(processor.chat_template, str) else repr(processor.chat_template)
    if template not in _GENERATION_PROMPTS:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "u"}]}]
        bare = processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
        full = processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        _GENERATION_PROMPTS[template] = full[len(bare):] if full.startswith(bare) else ""
    return _GENERATION_PROMPTS[template]
