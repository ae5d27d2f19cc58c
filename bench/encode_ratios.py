"""Encode-time ratios on 64 mixed items (median of 5), measured side by side in one run.

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


def measure(embedder, items, repeats: int = 5) -> dict:
    t = median_times({
        "direct": lambda: embedder.encode(items, mode="direct", batch_size=32),
        "auto_no_think": lambda: embedder.encode(items, mode="auto", think_threshold=1.01, batch_size=32),
        "one_by_one": lambda: [embedder.encode([it], mode="direct", batch_size=1) for it in items],
    }, repeats)
    direct, auto_no_think, one_by_one = t["direct"], t["auto_no_think"], t["one_by_one"]
    return {
        "auto_no_think_over_direct": auto_no_think / direct,
        "batched_speedup_over_one_by_one": one_by_one / direct,
        "seconds": {"direct": direct, "auto_no_think": auto_no_think, "one_by_one": one_by_one},
    }


if __name__ == "__main__":
    import torch

    torch.manual_seed(0)
    result = measure(tiny_embedder(), mixed_items(64))
    print(json.dumps(result, indent=2))
