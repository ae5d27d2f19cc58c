"""Sampling G completions per query from the policy, on one prefill per query.

The first assistant token is the decision, sampled from p(<think>) vs p(<emb>); <emb> ends the
completion at once, <think> continues (temperature sampling) to </think> or the budget. Each
completion's embedding is the hidden state at its <emb>, from the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..items import Item, load_visuals
from ..model.backbone import Backbone
from ..model.generation import Reasoner, SamplingConfig
from ..model.prefix_cache import prefill
from ..model.prompts import render_prompt
from ..model.teacher_forcing import ForcedOutput


@dataclass
class Rollouts:
    owners: torch.Tensor  # (N,) query index of each completion (groups contiguous)
    think: torch.Tensor  # (N,) bool: the completion reasoned
    rationale_ids: list[list[int] | None]  # tokens between <think> and </think>; None for direct
    closed: torch.Tensor  # (N,) bool: </think> written by the policy (direct rows: True)
    embeddings: torch.Tensor  # (N, D) L2-normalised
    p_think: torch.Tensor  # (Q,) the policy's decision probability per query

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


def completion_logprobs(out: ForcedOutput, rollouts: Rollouts, decision_only: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion's policy choices, padded (N, T), with a mask.

    Token 0 is the decision (over {<think>, <emb>}); then the rationale tokens and </think>,
    except a </think> the budget forced (not the policy's choice). ``decision_only``: the
    rationale was decoded greedily (not sampled), so only the decision is a policy choice.
    """
    n = rollouts.think.numel()
    device = out.target_logprobs.device
    decision = out.decision_logprob(rollouts.think.to(device))
    if decision_only:
        return decision.view(-1, 1), torch.ones(n, 1, device=device)
    per_row: list[list[torch.Tensor]] = [[decision[i]] for i in range(n)]
    for lp, row in zip(out.target_logprobs, out.target_row.tolist()):
        per_row[row].append(lp)
    for i in range(n):
        if not bool(rollouts.closed[i]):
            per_row[i].pop()  # the forced </think>
    T = max(len(r) for r in per_row)
    logp = torch.zeros(n, T, device=device)
    mask = torch.zeros(n, T, device=device)
    for i, r in enumerate(per_row):
        logp[i, :len(r)] = torch.stack(r)
        mask[i, :len(r)] = 1
    return logp, mask
