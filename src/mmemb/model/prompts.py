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
    """The chat text up to (and including) the start of the assistant turn."""
    return processor.apply_chat_template(chat_messages(item), tokenize=False, add_generation_prompt=True)
