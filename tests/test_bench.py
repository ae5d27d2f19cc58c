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


def test_mixed_load_reports_short_and_long_requests(embedders):
    import asyncio

    from load import long_text, mixed_load

    from mmemb.serve import ServeSettings, create_app, serve_in_thread

    embedder = embedders["qwen3_vl"]
    text = long_text(embedder, 300)
    from mmemb import Item
    from mmemb.model.token_count import count_tokens

    assert 250 <= count_tokens(embedder.backbone, [Item(text=text)])[0] <= 300
    shorts = [{"input": [f"{i} 1"], "reasoning": "never"} for i in range(8)]
    with serve_in_thread(create_app(embedder, ServeSettings(max_batch_tokens=600))) as (url, _):
        short, long = asyncio.run(mixed_load(url, shorts, {"input": [text], "reasoning": "never"}, 4, 1, "raw"))
    assert short["requests"] == 8 and short["errors"] == 0 and short["p99_ms"] >= short["p50_ms"] > 0
    assert long["long_requests"] >= 1 and long["long_errors"] == 0
