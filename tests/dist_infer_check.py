"""Run under `torch.distributed.run --nproc_per_node 2`: the inference jobs shared by 2 processes (gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_infer_check.py MODEL ITEMS OUT EVAL_DATA CACHE K

Encodes ITEMS into OUT/vecs (run_encode) and builds an IVF index of them in OUT/index (build_index),
then evaluates EVAL_DATA into OUT/eval, where process 1 dies (os._exit, as under a kill) at its
K-th encode call. tests/test_scale_out.py compares the first two with one process, and resumes the
killed evaluation with `mmemb eval --num-processes 2`.
"""

import os
import sys

import torch

from mmemb import Embedder
from mmemb.eval.runner import evaluate
from mmemb.index.store import IndexConfig
from mmemb.jobs.encode import run_encode
from mmemb.jobs.index import build_index
from mmemb.parallel import processes

# the settings tests/test_scale_out.py uses for its one-process runs
ENCODE = dict(chunk_size=6, mode="auto", max_reasoning_tokens=4)
INDEX = dict(kind="ivf", nlist=2)
INDEX_CHUNK = 8
EVAL = dict(mode="auto", max_reasoning_tokens=4, batch_size=1)  # chunks of 4 items


class DiesAt:
    """The embedder, until its k-th encode call: then the process ends at once."""

    def __init__(self, embedder, k: int):
        self.embedder, self.k, self.calls = embedder, k, 0

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def encode(self, items, **kw):
        self.calls += 1
        if self.calls == self.k:
            os._exit(3)
        return self.embedder.encode(items, **kw)


if __name__ == "__main__":
    model, items, out, data, cache, k = sys.argv[1:7]
    torch.set_num_threads(1)
    procs = processes()
    assert procs.count == 2, procs
    embedder = Embedder.from_pretrained(model)
    run_encode(embedder, items, f"{out}/vecs", show_progress=True, **ENCODE)
    build_index(embedder, items, f"{out}/index", IndexConfig(model=model, dim=embedder.dim, **INDEX),
                chunk_size=INDEX_CHUNK, show_progress=True)
    evaluate(DiesAt(embedder, int(k)) if procs.index == 1 else embedder, "minimmeb", f"{out}/eval", data=data,
             cache_dir=cache, **EVAL)
