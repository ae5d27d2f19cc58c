"""Compute a prompt once, continue it many ways.

Counterfactual selection scores K rationales (and none) per query, and GRPO samples G
completions per query: all continuations of the same prompt. The prompt is prefilled once,
its cache rows are repeated per continuation, and the continuations run on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .kv_cache import new_cache


@dataclass
class Prefilled:
    cache: Any  # a DynamicCache holding the prompts
    mask: torch.Tensor  # (B, L) attention mask of the prompts (left-padded)
    next_pos: torch.Tensor  # (B,) RoPE position of the first assistant token
    logits: torch.Tensor  # (B, V) next-token logits at the end of each prompt: the decision
    prompt_tokens: torch.Tensor  # (B,)

    def p_think(self, ids) -> torch.Tensor:
        return ids.p_think(self.logits)

    def repeat(self, owners: torch.Tensor) -> "Prefilled":
        """Row i of the result continues prompt ``owners[i]`` (the cache is re-indexed in place)."""
        self.cache.batch_select_indices(owners)
        return Prefilled(self.cache, self.mask[owners], self.next_pos[owners], self.logits[owners],
                         self.prompt_tokens[owners])


@torch.no_grad()
def prefill(backbone: Backbone, prompts: Sequence[str], visuals: Sequence[tuple]) -> Prefilled:
    """One forward over the prompts (up to the assistant turn), keeping the cache."""
    inputs = backbone.prepare(list(prompts), list(visuals))
    positions, next_pos = backbone.rope_positions(inputs)
    B, L = inputs["input_ids"].shape
    rows = torch.arange(B, device=backbone.device)
    cache = new_cache(backbone.config.text_config)
    out = backbone(inputs, positions, cache=cache, logits_index=(rows, torch.full_like(rows, L - 1)))
    mask = inputs["attention_mask"]
    return Prefilled(cache, mask, next_pos, out.logits, mask.sum(1))


@torch.no_grad()
def embed_tails(backbone: Backbone, state: Prefilled, tails: Sequence[list[int]], normalize: bool = True
                ) -> torch.Tensor:
    """Feed each row its tail of token ids (ending in <emb>) in one forward; return the hidden state
    at each tail's last token (L2-normalised unless ``normalize=False``). Tails are right-padded:
    padding after a row's <emb> cannot change it (causal attention)."""
    n = len(tails)
    T = max(len(t) for t in tails)
    device = state.mask.device
    ids = torch.full((n, T), backbone.ids.pad, dtype=torch.long, device=device)
    tail_mask = torch.zeros((n, T), dtype=state.mask.dtype, device=device)
    for i, t in enumerate(tails):
        ids[i, :len(t)] = torch.tensor(t, device=device)
        tail_mask[i, :len(t)] = 1
    positions = (state.next_pos.view(-1, 1) + torch.arange(T, device=device)).unsqueeze(0).expand(3, -1, -1)
    inputs = {"input_ids": ids, "attention_mask": torch.cat([state.mask, tail_mask], dim=1)}
    out = backbone(inputs, positions, cache=state.cache)
    last = torch.tensor([len(t) - 1 for t in tails], device=device)
    hidden = out.hidden[torch.arange(n, device=device), last].float()
    return F.normalize(hidden, dim=-1) if normalize else hidden
