"""Sampling G completions per query from the policy, on one prefill per query.

The first assistant token is the decision, sampled from p(<think>) vs p(<emb>); <emb> ends the
completion at once, <think> continues (temperature sampling) to </think> or the budget. Each
completion's embedding is the hidden state at its <emb>, from the same pass.

With a learned depth (:func:`choose_depths`), a reasoning completion may also close its rationale
after any of its sentences, with the policy's own probability of </think> there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from ..items import Item, load_visuals
from ..model.backbone import Backbone
from ..model.generation import Reasoner, SamplingConfig
from ..model.prefix_cache import prefill
from ..model.prompts import render_prompt
from ..model.teacher_forcing import ForcedBatch, ForcedOutput, build_forced_batch, forced_forward


@dataclass
class Rollouts:
    owners: torch.Tensor  # (N,) query index of each completion (groups contiguous)
    think: torch.Tensor  # (N,) bool: the completion reasoned
    rationale_ids: list[list[int] | None]  # tokens between <think> and </think>; None for direct
    closed: torch.Tensor  # (N,) bool: </think> written by the policy (direct rows: True)
    embeddings: torch.Tensor  # (N, D) L2-normalised
    p_think: torch.Tensor  # (Q,) the policy's decision probability per query
    # Learned depth only: per completion, its choices at sentence ends, (j, closed there), where j is
    # the number of rationale tokens before the choice; None without a depth choice.
    stops: list[list[tuple[int, bool]]] | None = None

    @property
    def reasoning_tokens(self) -> torch.Tensor:
        return torch.tensor([0 if r is None else len(r) for r in self.rationale_ids], dtype=torch.float32)


@torch.no_grad()
def sample_groups(backbone: Backbone, reasoner: Reasoner, items: Sequence[Item], group_size: int,
                  sampling: SamplingConfig, generator: torch.Generator | None = None,
                  prompts: Sequence[str] | None = None, visuals: Sequence[tuple] | None = None) -> Rollouts:
    """``prompts`` / ``visuals``: the items' rendered prompts and loaded images, where the caller has them."""
    ids = backbone.ids
    if prompts is None or visuals is None:
        prompts = [render_prompt(backbone.processor, it) for it in items]
        visuals = [load_visuals(it) for it in items]
    state = prefill(backbone, prompts, visuals)
    p = state.p_think(ids)
    owners = torch.arange(len(items), device=p.device).repeat_interleave(group_size)
    state = state.repeat(owners)
    think = torch.bernoulli(p[owners].cpu(), generator=generator).bool().to(p.device)
    first = torch.where(think, torch.full_like(owners, ids.think), torch.full_like(owners, ids.emb))
    result = reasoner.run([state.cache], [state.mask], state.next_pos, first, sampling, first_is_logits=False)
    rationale_ids = [tokens if t else None for tokens, t in zip(result.tokens, think.tolist())]
    closed = torch.tensor([c or not t for c, t in zip(result.closed_by_model, think.tolist())])
    emb = torch.nn.functional.normalize(result.embeddings, dim=-1)
    return Rollouts(owners.cpu(), think.cpu(), rationale_ids, closed, emb.cpu(), p.cpu())


@torch.no_grad()
def choose_depths(backbone: Backbone, reasoner: Reasoner, ro: Rollouts, prompts: Sequence[str],
                  visuals: Sequence[tuple], generator: torch.Generator | None = None) -> Rollouts:
    """Learned depth: each reasoning completion closes its rationale after one of its sentences.

    The rationale is the greedy one (every reasoning completion of a query shares it). At the end of
    each sentence but the last, a completion closes (</think>) with the policy's own p(</think>)
    there, else reads on; one that closes early keeps the sentences before and is embedded after
    them. Greedy decoding at inference does the same: it closes where </think> is the likeliest
    token, so the depth learned here is the depth the model writes.
    """
    ids = backbone.ids
    think = [i for i in range(ro.think.numel()) if ro.think[i]]
    stops: list[list[tuple[int, bool]]] = [[] for _ in range(ro.think.numel())]
    if not think:
        return dataclasses.replace(ro, stops=stops)
    first = {}  # query -> one of its reasoning completions (they share the rationale)
    for i in think:
        first.setdefault(int(ro.owners[i]), i)
    ends = reasoner.ends_sentence
    bounds = {q: [k + 1 for k, tok in enumerate(ro.rationale_ids[i][:-1]) if ends[tok]] for q, i in first.items()}
    queries = list(first)
    full = build_forced_batch(backbone, [prompts[q] for q in queries], [visuals[q] for q in queries],
                              [ro.rationale_ids[first[q]] for q in queries])
    close_logp = forced_forward(backbone, backbone, with_close_targets(full, [bounds[q] for q in queries], ids.end_think),
                                banned=reasoner.banned).target_logprobs.exp().cpu()
    p_close, at = {}, 0
    for q in queries:
        p_close[q] = close_logp[at:at + len(bounds[q])]
        at += len(bounds[q])
    rationale_ids = list(ro.rationale_ids)
    cut = []
    for i in think:
        q = int(ro.owners[i])
        for j, p in zip(bounds[q], p_close[q].tolist()):
            closes = float(torch.rand((), generator=generator)) < p
            stops[i].append((j, closes))
            if closes:
                rationale_ids[i] = rationale_ids[i][:j]
                cut.append(i)
                break
    embeddings = ro.embeddings.clone()
    closed = ro.closed.clone()
    if cut:
        owners = [int(ro.owners[i]) for i in cut]
        out = forced_forward(backbone, backbone, build_forced_batch(
            backbone, [prompts[o] for o in owners], [visuals[o] for o in owners], [rationale_ids[i] for i in cut]))
        embeddings[cut] = out.embeddings.cpu()
        closed[cut] = True
    return dataclasses.replace(ro, rationale_ids=rationale_ids, embeddings=embeddings, closed=closed, stops=stops)


def with_close_targets(batch: ForcedBatch, at: Sequence[Sequence[int]], end_think: int) -> ForcedBatch:
    """The same pass, its next-token targets replaced by </think> after ``at[row]`` rationale tokens
    (each j in 0..len(rationale)): the log-probability of closing there."""
    starts = {}  # row -> index of its first target (targets are listed row by row, in order)
    for k, row in enumerate(batch.target_row.tolist()):
        starts.setdefault(row, k)
    entries = [(row, starts[row] + j) for row, js in enumerate(at) for j in js]
    device = batch.target_row.device
    rows = torch.tensor([r for r, _ in entries], dtype=torch.long, device=device)
    pos = batch.target_pos[torch.tensor([k for _, k in entries], dtype=torch.long, device=device)]
    return dataclasses.replace(batch, target_row=rows, target_pos=pos, target_ids=torch.full_like(rows, end_think))


def completion_logprobs(out: ForcedOutput, rollouts: Rollouts, decision_only: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion's policy choices, padded (N, T), with a mask.

    Token 0 is the decision (over {<think>, <emb>}); then the rationale tokens and </think>,
    except a </think> the budget forced (not the policy's choice). ``decision_only``: the
    rationale was decoded greedily (not sampled), so only the decision is a policy choice.
    With depth choices (``rollouts.stops``; ``out`` from :func:`with_close_targets` at them), the
    choices at sentence ends follow the decision: log p(</think>) where the completion closed,
    log(1 - p(</think>)) where it read on.
    """
    n = rollouts.think.numel()
    device = out.target_logprobs.device
    decision = out.decision_logprob(rollouts.think.to(device))
    if decision_only and rollouts.stops is None:
        return decision.view(-1, 1), torch.ones(n, 1, device=device)
    per_row: list[list[torch.Tensor]] = [[decision[i]] for i in range(n)]
    for lp, row in zip(out.target_logprobs, out.target_row.tolist()):
        per_row[row].append(lp)
    for i in range(n):
        if rollouts.stops is not None:
            closes = [c for _, c in rollouts.stops[i]]
            per_row[i][1:] = [lp if c else torch.log1p(-lp.exp().clamp(max=1 - 1e-6)) for lp, c in zip(per_row[i][1:], closes)]
        elif not bool(rollouts.closed[i]):
            per_row[i].pop()  # the forced </think>
    T = max(len(r) for r in per_row)
    logp = torch.zeros(n, T, device=device)
    mask = torch.zeros(n, T, device=device)
    for i, r in enumerate(per_row):
        logp[i, :len(r)] = torch.stack(r)
        mask[i, :len(r)] = 1
    return logp, mask
