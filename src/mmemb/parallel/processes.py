"""Work shared by the processes that ``accelerate launch`` / torchrun started, for inference jobs.

An inference job (encode, eval, index build) cuts its work into fixed *units* (chunks of items)
whose layout does not depend on how many processes run it, so every unit is encoded exactly as a
one-process run encodes it and the merged outputs are the same. A process takes the next unit
nobody has taken (units cost unequal time: a chunk that reasons takes longer than one that does
not) by creating its claim file, which exactly one process can; a unit's output file marks it
done, so a killed run resumes (with any number of processes) and the main process can count
everyone's finished units for one global progress bar. All processes must see the same output
folder (one machine, or a filesystem the nodes share).

The process group itself comes from accelerate (``PartialState``): gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

from .launch import launched

# A process that finishes its units waits for the slowest one (a chunk of long reasoning on a big
# model can take many minutes); the default collective timeout would cut such a wait short.
WAIT_TIMEOUT = timedelta(hours=6)
POLL_SECONDS = 0.2  # how often the main process looks for the others' finished units (a few file stats)


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones (process 0 of 1 when nothing launched it)."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Return when every process has got here."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def share(self, obj: Any) -> Any:
        """The main process's ``obj``, on every process."""
        if self.count == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]


def processes(device: str = "cpu") -> Processes:
    """The processes of this job; joins their group (through accelerate) the first time it is called.

    ``device``: where the job runs; CPU processes talk over gloo, GPU processes over NCCL.
    """
    if not launched():
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu", timeout=WAIT_TIMEOUT)
    return Processes(state.process_index, state.num_processes)


def process_device(device: str) -> str:
    """``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``) under a launcher; others as given."""
    if device != "cuda" or not launched():
        return device
    from accelerate import PartialState

    return str(PartialState(cpu=False, timeout=WAIT_TIMEOUT).device)


def run_shared(sizes: Sequence[int], done: Callable[[int], bool], work: Callable[[int, Callable[[int], None]], None],
               procs: Processes, bar: Any, folder: Path) -> None:
    """Do units that are not done yet, with the other processes; return when all are done.

    ``sizes[u]``: items in unit ``u``; ``done(u)``: its output exists; ``work(u, progress)``: make
    it, calling ``progress(n)`` as items finish; ``folder``: where the claim files go (seen by every
    process). On the main process ``bar`` (a tqdm) counts every process's finished units (and its
    own items as they finish), so one bar shows the whole job; the others pass a disabled bar.
    """
    counted: set[int] = set()
    shown = [0] * len(sizes)  # items of each unit the bar already counts
    last_look = 0.0

    def count(u: int) -> None:
        counted.add(u)
        bar.update(sizes[u] - shown[u])

    def progress_of(u: int) -> Callable[[int], None]:
        def progress(items: int) -> None:
            if procs.is_main:
                shown[u] += items
                bar.update(items)
        return progress

    def look(force: bool = False) -> None:
        nonlocal last_look
        if not procs.is_main or (not force and time.monotonic() - last_look < POLL_SECONDS):
            return
        for u in range(len(sizes)):
            if u not in counted and done(u):
                count(u)
        last_look = time.monotonic()

    look(force=True)  # units finished before a kill
    if procs.count == 1:
        for u in range(len(sizes)):
            if u not in counted:
                work(u, progress_of(u))
                count(u)
        return
    claims = _claims_folder(folder, procs)
    for u in range(len(sizes)):
        if not done(u) and _claim(claims / str(u)):
            work(u, progress_of(u))
        look()
    while procs.is_main and len(counted) < len(sizes):
        time.sleep(POLL_SECONDS)
        look(force=True)
    procs.wait()
    if procs.is_main:
        shutil.rmtree(claims, ignore_errors=True)


def _claims_folder(folder: Path, procs: Processes) -> Path:
    """A folder for this run's claims (a killed run's claims are stale: its units are free again)."""
    if procs.is_main:
        for stale in folder.glob(".claims-*"):
            shutil.rmtree(stale, ignore_errors=True)
    claims = folder / f".claims-{procs.share(secrets.token_hex(6) if procs.is_main else None)}"
    claims.mkdir(parents=True, exist_ok=True)
    return claims


def _claim(path: Path) -> bool:
    """Create ``path`` unless it exists, atomically (O_EXCL, also on NFS): True for the one process that did."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
