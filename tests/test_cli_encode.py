"""`mmemb encode` from the command line, and resuming after a kill."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmemb.jobs.encode import read_items, run_encode

from .conftest import random_image


@pytest.fixture
def items_file(tmp_path):
    rng = np.random.default_rng(0)
    random_image(rng, 16, 48).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"id": "q1", "text": "What is the sum of the digits?", "image": "a.png",
         "instruction": "Represent the given image with the following question:"},
        {"id": "q2", "text": "3 7 1"},
        {"id": "q3", "image": "broken.png"},
        "a plain string line",
        {"id": "q5", "images": ["a.png", "a.png"], "text": "twice"},
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_encode_writes_vectors_and_rows(tiny_path, items_file, tmp_path):
    out = tmp_path / "out" / "vecs"
    proc = subprocess.run(
        [sys.executable, "-m", "mmemb.cli", "encode", "--model", tiny_path, "--input", str(items_file),
         "--output", str(out), "--mode", "auto", "--max-reasoning-tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "5 items, 1 failed" in proc.stdout
    vecs = np.load(out.with_suffix(".npy"))
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert vecs.shape[0] == 5 and [r["id"] for r in rows] == ["q1", "q2", "q3", "3", "q5"]
    assert rows[2]["ok"] is False and "cannot identify" in rows[2]["error"]
    assert np.allclose(np.linalg.norm(vecs[[0, 1, 3, 4]], axis=1), 1, atol=1e-5)
    assert not (out.parent / "vecs.parts").exists()


def test_read_items_names_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown item field"):
        read_items(p)


class _Dies:
    """Wraps an embedder and raises after a number of encode calls (a kill mid-run)."""

    def __init__(self, embedder, after):
        self.embedder, self.after, self.calls = embedder, after, 0
        self.dim = embedder.dim

    def encode(self, items, **kw):
        self.calls += 1
        if self.after is not None and self.calls > self.after:
            raise KeyboardInterrupt
        return self.embedder.encode(items, **kw)


def test_encode_job_resumes(embedders, items_file, tmp_path):
    e = embedders["qwen3_vl"]
    full = tmp_path / "full"
    run_encode(e, items_file, full, chunk_size=2, mode="direct")
    dying = _Dies(e, after=2)
    with pytest.raises(KeyboardInterrupt):
        run_encode(dying, items_file, tmp_path / "resumed", chunk_size=2, mode="direct")
    again = _Dies(e, after=None)
    run_encode(again, items_file, tmp_path / "resumed", chunk_size=2, mode="direct")
    assert again.calls == 1  # only the last chunk was left
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.load(full.with_suffix(".npy")))
    assert (tmp_path / "resumed.jsonl").read_text() == full.with_suffix(".jsonl").read_text()
