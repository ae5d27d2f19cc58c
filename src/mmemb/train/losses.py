"""Contrastive and joint losses, with negatives gathered across processes.

InfoNCE over cosine similarities (embeddings are L2-normalised) with a temperature. For query i
the columns are every target in the global batch (all positives and all hard negatives):

    loss_i = -log( sum_{c in P_i} exp(s_ic / t) / sum_{c in C} exp(s_ic / t) )

* ``P_i`` (the positives of i): every target whose content equals the positive of *any* pair
  whose query has the same content as i's query (one image with two captions: both captions
  are positives, neither is a negative of the other);
* ``C`` (the counted columns): one column per distinct target content. A target that appears
  twice in the batch (the same class label for two queries, a hard negative that is another
  pair's positive) is counted once, so a duplicate never acts as a negative of itself.

Cross-device negatives: every process gathers all rows (queries and targets) from all processes,
replacing its own slice by the local tensor so gradients reach the local embeddings only, and
computes the *global* loss. Each process's backward then yields exactly its share of the
global gradient; DDP/FSDP average over processes, so the loss handed to backward is multiplied
by the world size (see :class:`JointObjective`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import LossConfig

# Row kinds of the embedding rows one step produces.
DIRECT_QUERY, REASON_QUERY, TARGET, DUMMY = 0, 1, 2, -1


def info_nce(q: torch.Tensor, t: torch.Tensor, positive: torch.Tensor, counted: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean InfoNCE of queries ``q`` (Nq, D) over targets ``t`` (Nt, D), and which queries rank a positive first.

    ``positive`` (Nq, Nt) bool marks each query's positives; ``counted`` (Nt,) bool marks the
    columns that take part at all (duplicates off). Every query needs one counted positive.
    """
    logits = (q @ t.T) / temperature
    logits = logits.masked_fill(~counted.unsqueeze(0), float("-inf"))
    pos = positive & counted.unsqueeze(0)
    if not bool(pos.any(1).all()):
        raise ValueError("a query has no positive among the counted targets")
    loss = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)
    correct = pos.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    return loss.mean(), correct


def target_masks(query_pair: torch.Tensor, pair_query_key: torch.Tensor, pair_positive_key: torch.Tensor,
                 target_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives (Nq, Nt) and counted columns (Nt,) from content keys (see the module docstring).

    ``query_pair[i]`` is the pair of query row i; ``pair_*_key[j]`` the content keys of pair j's
    query and positive; ``target_key[c]`` that of target column c.
    """
    same_query = pair_query_key[query_pair].unsqueeze(1) == pair_query_key.unsqueeze(0)  # (Nq, P)
    is_positive_of = pair_positive_key.unsqueeze(1) == target_key.unsqueeze(0)  # (P, Nt)
    positive = (same_query.float() @ is_positive_of.float()) > 0
    first = torch.ones_like(target_key, dtype=torch.bool)
    if target_key.numel():
        _, inverse = torch.unique(target_key, return_inverse=True)
        order = torch.arange(target_key.numel(), device=target_key.device)
        first_index = torch.full((int(inverse.max()) + 1,), target_key.numel(), device=target_key.device,
                                 dtype=torch.long).scatter_reduce(0, inverse, order, "amin")
        first = first_index[inverse] == order
    return positive, first


def first_dims(x: torch.Tensor, d: int) -> torch.Tensor:
    """The first ``d`` dimensions of each row, L2-normalised (a Matryoshka sub-embedding)."""
    return F.normalize(x[:, :d], dim=-1)


# ---- cross-process gathering --------------------------------------------------------------------
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """All processes' rows of ``x`` concatenated in rank order (sizes may differ), and the sizes
    (pass them when known from an earlier gather of as many rows: saves a collective).

    The local slice is ``x`` itself, so gradients flow to it; the other slices are constants.
    """
    if world_size() == 1:
        return x, [x.shape[0]]
    if sizes is None:
        n = torch.tensor([x.shape[0]], device=x.device)
        gathered = [torch.zeros_like(n) for _ in range(world_size())]
        dist.all_gather(gathered, n)
        sizes = [int(s) for s in gathered]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[dist.get_rank()] = x
    return torch.cat(parts), sizes


def sum_across(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def max_across(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


# ---- the joint objective ----------------------------------------------------------------------
@dataclass
class RowMeta:
    """What each local embedding row is: ``kind``, its local ``pair`` (queries), its content ``key`` (targets)."""

    kind: torch.Tensor  # (n,) long: DIRECT_QUERY | REASON_QUERY | TARGET | DUMMY
    pair: torch.Tensor  # (n,) long: local pair index (-1 for targets and dummies)
    key: torch.Tensor  # (n,) long: target content key (0 for queries)


@dataclass
class PairMeta:
    """Per local pair: content keys of its query and positive; its share of the per-example terms."""

    query_key: torch.Tensor  # (P,) long
    positive_key: torch.Tensor  # (P,) long
    lm_tokens: torch.Tensor  # (P,) long: rationale tokens + </think> taught for this pair (0 if none)
    has_decision: torch.Tensor  # (P,) long: 1 if the pair's decision is taught

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.query_key, self.positive_key, self.lm_tokens, self.has_decision], 1)


@dataclass
class ContrastiveResult:
    loss: torch.Tensor  # to backward: world_size * (w_r·NCE_r + beta·NCE_d), gradients to local rows only
    terms: dict[str, float]  # unscaled global values
    norms: dict[str, int]  # global counts that normalise the per-example terms


class JointObjective:
    """L = w_r·NCE(reason) + alpha·LM + beta·NCE(direct) + gamma·decision, each term global over processes."""

    def __init__(self, weights: LossConfig):
        self.w = weights

    @property
    def needs_targets(self) -> bool:
        return self.w.reason_nce > 0 or self.w.direct_nce > 0

    def contrastive(self, emb: torch.Tensor, rows: RowMeta, pairs: PairMeta) -> ContrastiveResult:
        """The NCE terms over the rows of all processes (gathered), and the global normalisers."""
        world = world_size()
        pair_meta, pair_sizes = gather_rows(pairs.stacked())
        offsets = torch.tensor([0, *pair_sizes[:-1]], device=emb.device).cumsum(0)
        local_meta = torch.stack([rows.kind, rows.pair, rows.key], 1)
        all_meta, row_sizes = gather_rows(local_meta)
        rank_of_row = torch.repeat_interleave(torch.arange(len(row_sizes), device=emb.device),
                                              torch.tensor(row_sizes, device=emb.device))
        kind, pair, key = all_meta.unbind(1)
        pair = torch.where(pair >= 0, pair + offsets[rank_of_row], pair)
        all_emb, _ = gather_rows(emb, row_sizes)  # one row of meta per embedding row
        query_key, positive_key = pair_meta[:, 0], pair_meta[:, 1]
        norms = {"pairs": int(pair_meta.shape[0]), "lm_tokens": int(pair_meta[:, 2].sum()),
                 "decisions": int(pair_meta[:, 3].sum())}

        is_target = kind == TARGET
        targets, target_key = all_emb[is_target], key[is_target]
        total = emb.sum() * 0.0  # keeps the graph when every term is off
        terms: dict[str, float] = {}
        for d in self.w.matryoshka_dims:
            if d >= emb.shape[1]:
                raise ValueError(f"loss.matryoshka_dims: {d} is not smaller than the embedding size {emb.shape[1]}")
        for name, k, weight in (("nce_direct", DIRECT_QUERY, self.w.direct_nce),
                                ("nce_reason", REASON_QUERY, self.w.reason_nce)):
            is_q = kind == k
            if weight <= 0 or not bool(is_q.any()):
                continue
            positive, counted = target_masks(pair[is_q], query_key, positive_key, target_key)
            loss, correct = info_nce(all_emb[is_q], targets, positive, counted, self.w.temperature)
            total = total + weight * loss
            terms[name] = float(loss.detach())
            terms["acc_" + name.split("_")[1]] = float(correct.float().mean())
            for d in self.w.matryoshka_dims:  # the same term on the first d dimensions, re-normalised
                loss_d, _ = info_nce(first_dims(all_emb[is_q], d), first_dims(targets, d), positive, counted,
                                     self.w.temperature)
                total = total + weight * loss_d
                terms[f"{name}@{d}"] = float(loss_d.detach())
                terms["nce_matryoshka"] = terms.get("nce_matryoshka", 0.0) + weight * float(loss_d.detach())
        return ContrastiveResult(loss=total * world, terms=terms, norms=norms)

    def per_example(self, target_logprobs: torch.Tensor, decision_logits: torch.Tensor,
                    decision_target: torch.Tensor, norms: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Local share of alpha·LM + gamma·decision (normalised by global counts, times world size).

        Returns the loss to backward and the local sums (NLL, CE, correct decisions) for logging.
        """
        world = world_size()
        nll = -target_logprobs.sum()
        taught = decision_target >= 0
        ce = F.cross_entropy(decision_logits[taught], decision_target[taught], reduction="sum") if taught.any() \
            else decision_logits.sum() * 0.0
        loss = decision_logits.sum() * 0.0
        if self.w.lm > 0 and norms["lm_tokens"]:
            loss = loss + self.w.lm * nll / norms["lm_tokens"]
        if self.w.decision > 0 and norms["decisions"]:
            loss = loss + self.w.decision * ce / norms["decisions"]
        correct = (decision_logits[taught].argmax(1) == decision_target[taught]).sum()
        sums = torch.stack([nll.detach(), ce.detach(), correct.to(nll.dtype)])
        return loss * world, sums
