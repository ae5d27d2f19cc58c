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


def test_gpu_script_smoke_mode(tmp_path):
    """bench/gpu.sh runs every section on a tiny backbone on the CPU, as it will on a GPU."""
    import json
    import os
    import subprocess

    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["skipped"] == [] and r["setup"]["parameters_b"] > 0
    assert r["matmul"]["tflops"] > 0
    assert all(r["direct"][f"batch_{b}"]["tokens_per_s"] > 0 for b in (4, 8))
    assert 0 < r["direct"]["batch_8"]["utilisation"] < 1
    a = r["adaptive"]
    assert a["invocation"] == 0.5 and a["baselines_max_abs_diff"] <= 1e-4
    assert all(a[k] > 0 for k in ("adaptive_over_direct", "always_over_direct", "generate_over_reason",
                                  "two_pass_over_reason"))
    assert r["train"]["step_seconds"] > 0 and r["train"]["batch"] == 8
    assert r["vllm"]["status"].startswith("needs a GPU")
