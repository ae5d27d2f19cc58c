"""One training step (forward + backward, no optimizer step): plain, or GradCache.

The rows a step embeds (direct queries, teacher-forced reasoning queries, targets) are laid out
by :func:`plan_rows` and cut into chunks; every model pass is a
:func:`~mmemb.model.teacher_forcing.forced_forward` through :class:`Encoder`, so each step (plain) or
each chunk (GradCache) is exactly one forward of the wrapped module, as DDP/FSDP want.

GradCache (Gao et al., 2021): forward every chunk without gradients, compute the contrastive loss
on the cached embeddings (gathered across processes), take its gradient w.r.t. the embeddings,
then forward each chunk again with gradients and backpropagate ``<embedding, cached gradient>``
plus the chunk's own per-example terms (LM, decision). The RNG state of each chunk's first pass
is restored for its second, so dropout masks match. Gradients are synchronised across processes
only in the last chunk's backward.

Under FSDP and DeepSpeed ZeRO all processes must touch the same parameters in each pass: FSDP
gathers a sharded module's weights from every process when it runs, ZeRO reduces gradients in
buckets filled as they appear in the backward. So each step has as many forwards on every process,
and in each forward the vision tower runs for images (and for video) on every process or on none:
a process whose chunk lacks what another's has gets a blank dummy image (or video) row, with zero
loss but in the graph. (DDP needs none of this: it is told to look for unused parameters.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..items import Item
from ..model.backbone import Backbone
from ..model.prompts import render_prompt
from ..model.teacher_forcing import ForcedBatch, ForcedOutput, build_forced_batch, forced_forward, rationale_ids
from .data import LocalBatch, Side
from .losses import (
    DIRECT_QUERY,
    DUMMY,
    REASON_QUERY,
    TARGET,
    ContrastiveResult,
    JointObjective,
    PairMeta,
    RowMeta,
    max_across,
    sum_across,
)

# The plain step embeds a group in forwards of at most this many rows, sorted by length (less
# padding); all of them inside one call of the wrapped module, before one backward.
PLAIN_ROWS_PER_FORWARD = 64


class Encoder(nn.Module):
    """The module the trainer wraps (DDP/FSDP/DeepSpeed): teacher-forced passes over a list of batches."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batches: list[ForcedBatch]) -> list[ForcedOutput]:
        return [forced_forward(self.backbone, self.backbone, b) for b in batches]


@dataclass
class Row:
    side: Side
    rationale: list[int] | None  # teacher-forced rationale ids (reason rows)
    kind: int
    pair: int = -1  # local pair index of a query row
    decision: int = -1  # taught first token: 0 <think>, 1 <emb>; -1 none


@dataclass
class RowPlan:
    groups: list[list[Row]]  # [direct group (direct queries, then targets), reason group]
    pairs: PairMeta


@dataclass
class StepStats:
    terms: dict[str, float]  # loss (total) and each term, global and unscaled
    pairs: int  # pairs in the global batch
    skipped: int  # pairs left out of the global batch (bad rows / images)


def plan_rows(batch: LocalBatch, objective: JointObjective, backbone: Backbone) -> RowPlan:
    """Which rows this step embeds, following the loss weights (a term at 0 costs no pass)."""
    w = objective.w
    pairs = batch.pairs
    teach_rationale = w.reason_nce > 0 or w.lm > 0
    reason_ids = {i: rationale_ids(backbone, p.rationale) for i, p in enumerate(pairs)
                  if teach_rationale and p.rationale is not None}
    decides = {i for i, p in enumerate(pairs) if w.decision > 0 and p.label >= 0}
    if w.direct_nce > 0:
        direct_pairs = list(range(len(pairs)))
    else:  # only the decisions that no reasoning row carries
        direct_pairs = sorted(decides - set(reason_ids))
    decision_target = lambda i: (1 - pairs[i].label) if i in decides else -1  # noqa: E731  label 1 (reason) -> class 0

    direct = [Row(pairs[i].query, None, DIRECT_QUERY, i, decision_target(i) if i not in reason_ids else -1)
              for i in direct_pairs]
    if objective.needs_targets:
        direct += [Row(p.positive, None, TARGET) for p in pairs]
        direct += [Row(n, None, TARGET) for p in pairs for n in p.negatives]
    reason = [Row(pairs[i].query, ids, REASON_QUERY, i, decision_target(i)) for i, ids in reason_ids.items()]
    lm_tokens = [len(reason_ids[i]) + 1 if (i in reason_ids and w.lm > 0) else 0 for i in range(len(pairs))]
    as_long = partial(_long_tensor, device=backbone.device)
    meta = PairMeta(query_key=as_long([p.query.key for p in pairs]), positive_key=as_long([p.positive.key for p in pairs]),
                    lm_tokens=as_long(lm_tokens), has_decision=as_long([int(i in decides) for i in range(len(pairs))]))
    return RowPlan(groups=[direct, reason], pairs=meta)


class TrainStep:
    """Runs forward + backward for one local batch; the caller clips and steps the optimizer."""

    def __init__(self, accelerator: Any, model: nn.Module, backbone: Backbone, objective: JointObjective,
                 chunk_size: int = 0):
        self.accelerator, self.model, self.backbone = accelerator, model, backbone
        self.objective, self.chunk_size = objective, chunk_size
        self._dummies: dict[str, Side] = {}
        self._same_calls = _needs_same_calls(accelerator)
        image_processor = backbone.processor.image_processor
        self._pixels_per_token = (image_processor.patch_size * image_processor.merge_size) ** 2

    def __call__(self, batch: LocalBatch) -> StepStats:
        plan = plan_rows(batch, self.objective, self.backbone)
        chunks = self._chunks(plan)
        forced = [self._forced(rows) for rows in chunks]
        step = self._gradcache if self.chunk_size > 0 else self._plain
        con, sums = step(plan, chunks, forced)
        return self._stats(con, sums, batch)

    # ---- the two step kinds ----------------------------------------------------------------
    def _plain(self, plan: RowPlan, chunks: list[list[Row]], forced: list[ForcedBatch]):
        outs = self.model(forced)
        emb = torch.cat([o.embeddings for o in outs])
        con = self.objective.contrastive(emb, self._row_meta(chunks), plan.pairs)
        loss, sums = self._per_example(outs, chunks, con.norms)
        self.accelerator.backward(con.loss + loss)
        return con, sums

    def _gradcache(self, plan: RowPlan, chunks: list[list[Row]], forced: list[ForcedBatch]):
        states, cached = [], []
        with torch.no_grad():
            for fb in forced:
                states.append(_RngState.capture(self.backbone.device))
                cached.append(self.model([fb])[0].embeddings)
        emb = torch.cat(cached).requires_grad_()
        con = self.objective.contrastive(emb, self._row_meta(chunks), plan.pairs)
        grad = torch.autograd.grad(con.loss, emb)[0] if con.loss.requires_grad else torch.zeros_like(emb)
        grads = grad.split([len(rows) for rows in chunks])
        sums = 0
        for k, (rows, fb) in enumerate(zip(chunks, forced)):
            last = k == len(chunks) - 1
            with states[k].restored(), self._sync(last):
                outs = self.model([fb])
                loss, s = self._per_example(outs, [rows], con.norms)
                surrogate = (outs[0].embeddings * grads[k]).sum() + loss
                self.accelerator.backward(surrogate)
            sums = sums + s
        return con, sums

    # ---- pieces ------------------------------------------------------------------------------
    def _chunks(self, plan: RowPlan) -> list[list[Row]]:
        """Each group in the same number of chunks on every process (FSDP needs equal forwards).

        A process with fewer rows than chunks fills the gap with a dummy row whose loss is zero.
        """
        sizes = [len(g) for g in plan.groups]
        size = self.chunk_size or PLAIN_ROWS_PER_FORWARD
        wanted = torch.tensor([-(-n // size) for n in sizes], device=self.backbone.device)
        counts = max_across(wanted).tolist()
        if sum(counts) == 0:
            counts[0] = 1  # nothing to embed anywhere: still one (dummy) pass, so every process steps
        out = []
        for group, n in zip(plan.groups, counts):
            order = np.argsort([self._length(r) for r in group], kind="stable")  # similar lengths pad less
            for part in np.array_split(order, n) if n else []:
                out.append([group[i] for i in part] or [self._dummy_row("text")])
        if self._same_calls:
            self._same_vision_calls(out)
        return out

    def _same_vision_calls(self, chunks: list[list[Row]]) -> None:
        """Where another process's chunk has images (video) and this one's has none, add a dummy row with them."""
        has = [[any(r.side.visuals[0] for r in c), any(r.side.visuals[1] for r in c)] for c in chunks]
        wanted = max_across(torch.tensor(has, dtype=torch.long, device=self.backbone.device)).tolist()
        for chunk, mine, needed in zip(chunks, has, wanted):
            for kind, own, need in zip(("image", "video"), mine, needed):
                if need and not own:
                    chunk.append(self._dummy_row(kind))

    def _length(self, row: Row) -> float:
        """Rough token count of a row (prompt characters / 3 + vision tokens), to sort rows by length."""
        images, frames = row.side.visuals
        pixels = sum(im.width * im.height for im in [*images, *(frames or [])])
        return len(row.side.prompt) / 3 + pixels / self._pixels_per_token + len(row.rationale or ())

    def _forced(self, rows: list[Row]) -> ForcedBatch:
        return build_forced_batch(self.backbone, [r.side.prompt for r in rows], [r.side.visuals for r in rows],
                                  [r.rationale for r in rows])

    def _row_meta(self, chunks: list[list[Row]]) -> RowMeta:
        rows = [r for c in chunks for r in c]
        as_long = partial(_long_tensor, device=self.backbone.device)
        return RowMeta(kind=as_long([r.kind for r in rows]), pair=as_long([r.pair for r in rows]),
                       key=as_long([r.side.key if r.kind == TARGET else 0 for r in rows]))

    def _per_example(self, outs: list[ForcedOutput], chunks: list[list[Row]], norms: dict[str, int]):
        device = self.backbone.device
        logprobs = torch.cat([o.target_logprobs for o in outs])
        decision_logits = torch.cat([o.decision_logits for o in outs])
        target = torch.tensor([r.decision for c in chunks for r in c], dtype=torch.long, device=device)
        return self.objective.per_example(logprobs, decision_logits, target, norms)

    def _sync(self, last: bool):
        """Gradient sync only in the last chunk's backward (DDP no_sync; DeepSpeed's accumulation boundary)."""
        if last:
            return contextlib.nullcontext()
        return _no_sync(self.accelerator, self.model)

    def _dummy_row(self, kind: str) -> Row:
        """A row whose loss is zero: text only, or with a blank image, or a blank 2-frame video."""
        if kind not in self._dummies:
            from PIL import Image

            blank = Image.new("RGB", (32, 32))
            item = {"text": Item(text="."), "image": Item(text=".", images=[blank]),
                    "video": Item(text=".", video=[blank, blank])}[kind]
            visuals = (list(item.images), list(item.video) if item.video else None)
            self._dummies[kind] = Side(render_prompt(self.backbone.processor, item), visuals, 0)
        return Row(self._dummies[kind], None, DUMMY)

    def _stats(self, con: ContrastiveResult, sums: torch.Tensor, batch: LocalBatch) -> StepStats:
        terms, norms = dict(con.terms), con.norms
        counts = sum_across(torch.cat([sums.double(), torch.tensor([len(batch.skipped)], dtype=torch.double,
                                                                   device=sums.device)]))
        nll, ce, correct, skipped = counts.tolist()
        w = self.objective.w
        if norms["lm_tokens"]:
            terms["lm"] = nll / norms["lm_tokens"]
        if norms["decisions"]:
            terms["decision"] = ce / norms["decisions"]
            terms["acc_decision"] = correct / norms["decisions"]
        terms["loss"] = (terms.get("nce_matryoshka", 0.0)  # already weighted
                         + w.reason_nce * terms.get("nce_reason", 0.0) + w.direct_nce * terms.get("nce_direct", 0.0)
                         + w.lm * terms.get("lm", 0.0) + w.decision * terms.get("decision", 0.0))
        return StepStats(terms=terms, pairs=norms["pairs"], skipped=int(skipped))


def _needs_same_calls(accelerator: Any) -> bool:
    """Whether every process must run the same modules in each pass (FSDP, DeepSpeed ZeRO; see above)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _long_tensor(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


@contextlib.contextmanager
def _no_sync(accelerator: Any, model: nn.Module):
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # accelerate turns this flag into DeepSpeed's gradient-accumulation boundary
        accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        if deepspeed:
            accelerator.gradient_state._set_sync_gradients(True)


class _RngState:
    """The CPU (and current CUDA device) RNG state, to replay a chunk's dropout masks."""

    def __init__(self, cpu: torch.Tensor, cuda: torch.Tensor | None, device: torch.device):
        self.cpu, self.cuda, self.device = cpu, cuda, device

    @classmethod
    def capture(cls, device: torch.device) -> "_RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield
