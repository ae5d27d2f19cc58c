"""The benchmark suite's pieces run and print their table (timings themselves are bench/README.md's)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_encode_ratios_and_table(embedders, mixed_items):
    from encode_ratios import measure
    from run import ROWS, table

    out = measure(embedders["qwen3_vl"], mixed_items, repeats=1, ratio_repeats=1)
    assert out["auto_no_think_over_direct"] > 0 and out["batched_speedup_over_one_by_one"] > 0
    text = table({"auto_no_think_over_direct": out["auto_no_think_over_direct"]})
    lines = text.splitlines()
    assert len(lines) == 2 + len(ROWS) and "| auto mode that decides not to think" in lines[2]
    assert lines[3].split("|")[2].strip() == "—"  # a measure not taken shows as such
