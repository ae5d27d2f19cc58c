"""An mmemb checkpoint as an `mteb` model: ``mteb.evaluate(mteb_model("runs/demo/model"), tasks)``.

MTEB hands the encoder batches of ``{"text": [...], "image": [...]}`` (an image, or a list of images,
per row; ``"video"``: frames) and says whether they are queries or documents. Queries are encoded
the way mmemb encodes anything on its own (``auto`` by default: the model decides whether to
reason), documents the way it encodes a corpus (``direct``), each with the instruction MTEB gives
for the task and side (the task's own prompt, or ``prompts`` keyed by task name or task type), or
mmemb's default instruction where there is none. Vectors are L2-normalised; similarity is cosine.

Needs the ``mteb`` package (``pip install mmemb[mteb]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from ..defaults import CORPUS_MODE, DEFAULT_MODE
from ..items import Item
from ..model.embedder import Embedder


class MmembEncoder(AbsEncoder):
    def __init__(self, embedder: Embedder, name: str = "mmemb/model", query_mode: str = DEFAULT_MODE,
                 document_mode: str = CORPUS_MODE, prompts: dict[str, str | dict[str, str]] | None = None,
                 **encode_kw: Any):
        self.model = self.embedder = embedder
        self.query_mode, self.document_mode = query_mode, document_mode
        self.prompts_dict = prompts
        self.encode_kw = encode_kw
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name if "/" in name else f"mmemb/{name}", revision="local", embed_dim=embedder.dim,
            similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch"], modalities=["text", "image", "video"]))

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None,
               **kwargs: Any) -> np.ndarray:
        instruction = self.get_task_instruction(task_metadata, prompt_type) or None
        items = [item for batch in inputs for item in batch_items(batch, instruction)]
        mode = self.document_mode if prompt_type == PromptType.document else self.query_mode
        opts = {"batch_size": kwargs.get("batch_size", 32), "show_progress": kwargs.get("show_progress_bar", False),
                **self.encode_kw}
        # on_error="raise": MTEB has no way to leave an item out, so a bad one stops the task, named
        return self.embedder.encode(items, mode=mode, on_error="raise", **opts).embeddings


def batch_items(batch: dict[str, list], instruction: str | None) -> list[Item]:
    """One Item per row of an MTEB batch: its images (or video frames), then its text."""
    n = max(len(v) for k, v in batch.items() if k in ("text", "image", "video"))
    items = []
    for i in range(n):
        images = batch["image"][i] if "image" in batch else []
        video = batch["video"][i] if "video" in batch else None
        items.append(Item(text=batch["text"][i] if "text" in batch else None, instruction=instruction,
                          images=images if isinstance(images, list) else [images],
                          video=None if video is None else list(video)))
    return items


def mteb_model(model: str | Path | Embedder, **opts: Any) -> MmembEncoder:
    """An MTEB model for a checkpoint folder (or a loaded Embedder). ``opts``: ``query_mode``,
    ``document_mode``, ``prompts``, and any ``Embedder.encode`` option (``think_threshold``,
    ``max_reasoning_tokens``, ``truncate_dim`` ...)."""
    if isinstance(model, Embedder):
        return MmembEncoder(model, **opts)
    return MmembEncoder(Embedder.from_pretrained(str(model)), name=Path(model).name, **opts)
