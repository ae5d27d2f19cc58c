"""`mmemb encode` from the command line, and resuming after a kill."""

from __future__ import annotations

import json
import subprocess
import sys
import time

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
    assert "past_key_values" not in proc.stderr and "Warning" not in proc.stderr  # a normal run is quiet
    vecs = np.load(out.with_suffix(".npy"))
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert vecs.shape[0] == 5 and [r["id"] for r in rows] == ["q1", "q2", "q3", "3", "q5"]
    assert rows[2]["ok"] is False and "cannot identify" in rows[2]["error"]
    assert np.allclose(np.linalg.norm(vecs[[0, 1, 3, 4]], axis=1), 1, atol=1e-5)
    assert not (out.parent / "vecs.parts").exists()


def test_only_the_cache_rename_warnings_of_transformers_are_silenced():
    import logging
    import warnings

    from mmemb.model import silence_cache_rename_warnings

    with warnings.catch_warnings(record=True) as seen:  # (pytest resets the filters of each test)
        silence_cache_rename_warnings()
        warnings.filterwarnings("always", message="another")
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning)
        warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in seen] == ["another deprecation"]
    log = logging.getLogger("transformers.utils.generic")
    record = (lambda msg: log.makeRecord(log.name, logging.WARNING, __file__, 1, msg, None, None))
    assert not log.filter(record("`past_key_values`/`cache_params` are deprecated. Use `cache` instead."))
    assert log.filter(record("something else"))


def test_read_items_names_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown item field"):
        read_items(p, on_error="raise")
    ok, bad = read_items(p)  # the default (skip): the bad line stands as a failed row
    assert ok.text == "ok" and bad.id == "1" and bad.error.endswith("bad.jsonl:2: unknown item field(s): ['txt']")


BAD_LINES = [  # (raw line, the reason its row must give; None: a good row)
    (b'{"id": "a", "text": "3 7 1"}', None),
    (b'{"id": "b", "text": "caf\xe9 au lait"}', "not UTF-8 text (byte 0xe9"),  # Latin-1 inside valid JSON
    (b'{"id": "c", "text": "cut off', "not valid JSON"),
    (b'{"id": "d", "txt": "typo"}', "unknown item field(s): ['txt']"),
    (b'{"id": "e", "text": 5}', "field 'text' must be a string, not a number"),
    (b'{"id": "f", "images": [3]}', "field 'images' must be an image path or a list of them, not a list"),
    (b'{"id": "g", "text": "lone \\udc80 surrogate"}', "text is not valid Unicode text (lone surrogate"),
    (b'\xff\xfe\x00garbage', "not UTF-8 text (byte 0xff at byte 1"),
    (b'[1, 2]', "an item must be a JSON object, not a list"),
    (b'"a plain string line"', None),
    (b'{"id": "k", "text": "1 2", "instruction": "Represent the given caption."}', None),
]


@pytest.fixture
def bad_lines_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(raw + b"\n" for raw, _ in BAD_LINES))
    return path


def test_bad_lines_fail_alone_in_encode_and_index_build(tiny_path, bad_lines_file, tmp_path):
    from typer.testing import CliRunner

    from mmemb.cli import app

    out = tmp_path / "vecs"
    r = CliRunner().invoke(app, ["encode", "--model", tiny_path, "--input", str(bad_lines_file), "--output", str(out),
                                 "--mode", "direct", "--chunk-size", "4"])
    assert r.exit_code == 0, r.output
    n_bad = sum(reason is not None for _, reason in BAD_LINES)
    assert f"{len(BAD_LINES)} items, {n_bad} failed" in r.stdout
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    vecs = np.load(out.with_suffix(".npy"))
    assert len(rows) == len(vecs) == len(BAD_LINES)
    for line, ((_, reason), row) in enumerate(zip(BAD_LINES, rows), 1):
        if reason is None:
            assert row["ok"] and abs(np.linalg.norm(vecs[line - 1]) - 1) < 1e-5
        else:
            assert not row["ok"] and not vecs[line - 1].any()
            assert row["error"].startswith(f"{bad_lines_file}:{line}: ") and reason in row["error"], row
            assert f"{bad_lines_file}:{line}: " in r.stderr  # reported on the terminal too
    # a line whose id can still be read keeps it; others are numbered by position, as rows without one
    assert [r["id"] for r in rows][:5] == ["a", "1", "2", "d", "e"] and rows[9]["id"] == "9"

    index = tmp_path / "index"
    r = CliRunner().invoke(app, ["index", "build", "--model", tiny_path, "--input", str(bad_lines_file),
                                 "--out", str(index)])
    assert r.exit_code == 0, r.output
    assert f"added {len(BAD_LINES) - n_bad} items" in r.stdout and f"{n_bad} failed" in r.stdout
    stored = [json.loads(line)["id"] for line in (index / "items.jsonl").read_text().splitlines()]
    assert stored == ["a", "9", "k"]
    assert f"{bad_lines_file}:3: not valid JSON" in r.stderr


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


class _Slow(_Dies):
    """Also takes ``delay`` seconds per encode call (so that saving by time is what triggers)."""

    def __init__(self, embedder, after, delay):
        super().__init__(embedder, after)
        self.delay = delay

    def encode(self, items, **kw):
        time.sleep(self.delay)
        return super().encode(items, **kw)


def test_encode_job_saves_by_time_and_a_kill_loses_nothing_saved(embedders, tmp_path):
    e = embedders["qwen3_vl"]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": f"{i % 10} {i * 7 % 10}"}) + "\n" for i in range(40)))
    opts = dict(chunk_size=1000, batch_size=1, mode="direct")  # blocks of 16 rows; 1000 rows never come
    run_encode(e, path, tmp_path / "full", **opts)
    with pytest.raises(KeyboardInterrupt):  # killed while encoding the third block
        run_encode(_Slow(e, after=2, delay=0.15), path, tmp_path / "resumed", save_every_s=0.1, **opts)
    parts = sorted(p.name for p in (tmp_path / "resumed.parts").glob("*.jsonl"))
    assert parts == ["000000000-000000016.jsonl", "000000016-000000032.jsonl"]  # saved by time
    again = _Dies(e, after=None)
    run_encode(again, path, tmp_path / "resumed", save_every_s=0.1, **opts)
    assert again.calls == 1  # only the last block was left
    assert (tmp_path / "resumed.npy").read_bytes() == (tmp_path / "full.npy").read_bytes()
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


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
