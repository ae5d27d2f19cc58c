"""Time ratios that survive a busy machine: the variants run in alternation, several rounds.

On a shared machine the load changes from one second to the next, so two variants timed one after
the other compare two different machines. Timed in alternation (A B C A B C ...), neighbouring
samples see about the same load; the ratio to the reference is taken within each round and the
median over rounds drops the rounds that a burst of load split unevenly.

Encodes are timed on one intra-op thread. With a pool of threads, a competing process preempts
one of them and the others wait at the next barrier, which slows a decode step (many small ops)
and a prefill (few large ones) by different factors: on a 2-core machine, with a second process
busy, the tiny model's reason / direct ratio fell from 3.0 to 2.1 on two threads, and stayed
within 0.88-1.07x of itself on one (tests/test_timing.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions run in turn within every round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratios(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Per variant: the median over rounds of (its time / the reference's time in the same round)."""
    ref = times[reference]
    return {name: statistics.median(t / r for t, r in zip(ts, ref)) for name, ts in times.items()}


def encode_time_ratios(systems: dict[str, tuple[Any, dict[str, Any]]], items: Sequence[Any], reference: str,
                       rounds: int = 5, warmup: int = 1, threads: int = 1) -> dict[str, Any]:
    """Encode ``items`` with each system (name -> (embedder, encode options)) in alternation, on
    ``threads`` intra-op threads.

    Returns the median ratio of each system's time to ``reference``'s and the raw seconds per round.
    """
    import torch

    fns = {name: (lambda e=embedder, o=opts: e.encode(items, **o)) for name, (embedder, opts) in systems.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = interleaved_times(fns, rounds=rounds, warmup=warmup)
    finally:
        torch.set_num_threads(before)
    return {"over_" + reference: median_ratios(times, reference), "seconds": times, "rounds": rounds,
            "items": len(items), "threads": threads}
