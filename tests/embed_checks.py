"""Assertions shared by the embedder and gate tests."""

from __future__ import annotations

import numpy as np


def assert_auto_matches_own_modes(embedder, items, auto, max_reasoning_tokens: int) -> None:
    """An auto-mode vector equals the same model's reason-mode vector where the item reasoned, else its
    direct-mode vector: deciding adds nothing to either path."""
    reason = embedder.encode(items, mode="reason", max_reasoning_tokens=max_reasoning_tokens)
    direct = embedder.encode(items, mode="direct")
    for i in range(len(items)):
        ref = reason if auto.reasoned[i] else direct
        assert np.abs(auto.embeddings[i] - ref.embeddings[i]).max() <= 1e-4
