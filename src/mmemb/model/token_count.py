"""How many positions an item takes in the model, counted without running it: its rendered prompt's
text tokens, the vision tokens each image or video expands into, and ``<emb>``. The server refuses
inputs over its token limit and sizes its batches with this."""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..items import DEFAULT_MAX_IMAGE_PIXELS, Item, ItemError, load_image
from .prompts import render_prompt


def count_tokens(backbone: Any, items: list[Item], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[int]:
    """Prefill length of each item in direct mode (= ``Encoded.prompt_tokens`` + 1 for ``<emb>``).

    Images may be given loaded (PIL) or as sources (loaded here to read their size). Video counts
    leave out the few timestamp tokens some processors put between frames. An image the processor
    refuses (e.g. an extreme aspect ratio) raises an ItemError naming the item.
    """
    processor = backbone.processor
    texts = [render_prompt(processor, item) for item in items]
    lengths = [len(ids) for ids in backbone.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = []
    for i, (item, n) in enumerate(zip(items, lengths)):
        sizes = [_hw(im, max_pixels) for im in item.images]
        videos = [(len(item.video), *_hw(item.video[0], max_pixels))] if item.video else []
        try:
            vision = processor._get_num_multimodal_tokens(image_sizes=sizes or None, video_sizes=videos or None)
        except ValueError as e:
            raise ItemError(i, item.id, f"the model's processor refuses it: {e}") from None
        # each image (video) is one placeholder token in the rendered text; the processor expands it
        n += sum(k - 1 for k in getattr(vision, "num_image_tokens", None) or [])
        n += sum(k - 1 for k in getattr(vision, "num_video_tokens", None) or [])
        out.append(n + 1)
    return out


def _hw(image: Any, max_pixels: int) -> tuple[int, int]:
    w, h = (image if isinstance(image, Image.Image) else load_image(image, max_pixels)).size
    return h, w
