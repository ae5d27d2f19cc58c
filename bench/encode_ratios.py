"""Encode-time ratios on 64 mixed items (interleaved medians), measured side by side in one run.

    python bench/encode_ratios.py

auto (threshold > 1: decides not to think) / direct   goal <= 1.05   Embedder.encode
batched (batch 32) / item by item                      goal >= 5x     Embedder.encode
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_times, mixed_items, tiny_embedder  # noqa: E402


def measure(embedder, items, repeats: int = 5, ratio_repeats: int = 15) -> dict:
    """The auto / direct pair is timed on its own, ``ratio_repeats`` times: each call takes tens of
    milliseconds here, so a 5 % goal needs more samples than the median of 5 gives."""
    direct = lambda: embedder.encode(items, mode="direct", batch_size=32)  # noqa: E731
    pair = median_times({"direct": direct, "auto_no_think": lambda: embedder.encode(
        items, mode="auto", think_threshold=1.01, batch_size=32)}, ratio_repeats)
    batching = median_times({"direct": direct, "one_by_one": lambda: [
        embedder.encode([it], mode="direct", batch_size=1) for it in items]}, repeats)
    return {
        "auto_no_think_over_direct": pair["auto_no_think"] / pair["direct"],
        "batched_speedup_over_one_by_one": batching["one_by_one"] / batching["direct"],
        "seconds": {"direct": pair["direct"], "auto_no_think": pair["auto_no_think"],
                    "one_by_one": batching["one_by_one"]},
    }

if __name__ == "__main__":
    import torch

    torch.manual_seed(0)
    result = measure(tiny_embedder(), mixed_items(64))
    print(json.dumps(result, indent=2))
