"""mmemb: multimodal embeddings from a multimodal LLM that reasons only when reasoning helps."""

from ._version import __version__
from .items import Item, Pair, RankingTask
from .model.embedder import Embedder, Encoded


def load_embedder(path: str, **opts) -> Embedder:
    """Load an embedding model from a checkpoint folder (or a hub name when the hub is reachable)."""
    return Embedder.from_pretrained(path, **opts)


__all__ = ["Embedder", "Encoded", "Item", "Pair", "RankingTask", "load_embedder", "__version__"]
