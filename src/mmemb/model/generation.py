"""Batched reasoning on the KV cache, ending at the <emb> token.

After the prompt is prefilled, each row writes its rationale one token per step on the same
cache, closes it with </think> (by itself, or forced at the budget) and feeds <emb>; the
hidden state at that step is the row's embedding. Rows that finish leave the batch (their cache
rows are dropped), so no row ever attends to padding gaps and nothing is prefilled twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backbone import Backbone
from .kv_cache import new_cache


@dataclass
class SamplingConfig:
    max_tokens: int = 128  # rationale tokens before </think> is forced
    max_steps: int | None = None  # sentences before </think> is forced (reasoning depth)
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)


@dataclass
class ReasoningResult:
    embeddings: torch.Tensor  # (B, D), not normalised
    tokens: list[list[int]]  # per row: rationale token ids (without <think>, </think>)
    closed_by_model: list[bool]  # False where the budget forced </think>


class Reasoner:
    """Decodes rationales for a batch whose cache already holds prompt (+ <think>)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        ids = backbone.ids
        vocab = backbone.lm_head.weight.shape[0]
        banned = torch.zeros(vocab, dtype=torch.bool)
        banned[[i for i in ids.special if i < vocab]] = True
        banned[len(backbone.tokenizer):] = True  # unused rows of a padded vocabulary
        banned[ids.end_think] = False
        self.banned = banned
        self.ends_sentence = _sentence_end_ids(backbone.tokenizer, vocab)

    @torch.no_grad()
    def run(
        self,
        cache,
        attention_mask: torch.Tensor,
        next_pos: torch.Tensor,
        first: torch.Tensor,
        sampling: SamplingConfig,
        first_is_logits: bool,
    ) -> ReasoningResult:
        """Decode until every row has fed <emb>.

        ``first`` is either the next-token logits after the prefill (``first_is_logits``) or the
        token ids to feed first (e.g. <think> after a decision step). ``next_pos`` is the RoPE
        position of the first token to be fed, per row.
        """
        bb, ids = self.backbone, self.backbone.ids
        device = attention_mask.device
        B = attention_mask.shape[0]
        banned = self.banned.to(device)
        sentence_end = self.ends_sentence.to(device)
        rows = torch.arange(B, device=device)  # original row of each active row
        n_tokens = torch.zeros(B, dtype=torch.long, device=device)
        n_steps = torch.zeros(B, dtype=torch.long, device=device)
        closing = torch.zeros(B, dtype=torch.bool, device=device)  # fed </think>: <emb> comes next
        tokens: list[list[int]] = [[] for _ in range(B)]
        closed_by_model = [True] * B
        out = torch.zeros(B, bb.hidden_size, dtype=torch.float32, device=device)
        mask, pos = attention_mask, next_pos.clone()
        logits = first if first_is_logits else None
        feed = None if first_is_logits else first
        while rows.numel():
            if feed is None:
                feed = self._choose(logits, banned, sampling)
                over = (n_tokens >= sampling.max_tokens) | (
                    (n_steps >= sampling.max_steps) if sampling.max_steps is not None else torch.zeros_like(closing))
                forced = over & ~closing & (feed != ids.end_think)
                for r in rows[forced].tolist():
                    closed_by_model[r] = False
                feed = torch.where(forced, torch.full_like(feed, ids.end_think), feed)
                feed = torch.where(closing, torch.full_like(feed, ids.emb), feed)
            is_text = (feed != ids.end_think) & (feed != ids.emb) & (feed != ids.think)
            for r, tok, text in zip(rows.tolist(), feed.tolist(), is_text.tolist()):
                if text:
                    tokens[r].append(tok)
            n_tokens += is_text.long()
            n_steps += (is_text & sentence_end[feed]).long()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_inputs = {"input_ids": feed.view(-1, 1), "attention_mask": mask}
            positions = pos.view(1, -1, 1).expand(3, -1, 1)
            result = bb(step_inputs, positions, cache=cache, logits_index=(torch.arange(feed.numel(), device=device),
                                                                           torch.zeros_like(feed)))
            pos = pos + 1
            done = feed == ids.emb
            closing = feed == ids.end_think
            logits = result.logits
            feed = None
            if done.any():
                out[rows[done]] = result.hidden[done, -1].float()
                keep = torch.nonzero(~done).flatten()
                cache.batch_select_indices(keep)
                rows, mask, pos, closing, logits = rows[keep], mask[keep], pos[keep], closing[keep], logits[keep]
                n_tokens, n_steps = n_tokens[keep], n_steps[keep]
        return ReasoningResult(out, tokens, closed_by_model)

    @staticmethod
    def _choose(logits, banned, sampling: SamplingConfig) -> torch.Tensor:
        logits = logits.masked_fill(banned, float("-inf"))
        if not sampling.temperature:
            return logits.argmax(dim=-1)
        scaled = logits / sampling.temperature
        if sampling.top_k:
            kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=sampling.generator).flatten().to(logits.device)


def _sentence_end_ids(tokenizer, vocab: int) -> torch.Tensor:
    """Tokens that end a sentence (a reasoning step): those whose text ends with . ! ? or a newline."""
    flags = torch.zeros(vocab, dtype=torch.bool)
    ids = [[i] for i in range(min(vocab, len(tokenizer)))]
    # The fast backend decodes a released 151k vocabulary in under a second; batch_decode's
    # per-id Python work takes ~15 s there.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    texts = backend.decode_batch(ids, skip_special_tokens=False) if backend is not None else tokenizer.batch_decode(ids)
    flags[:len(texts)] = torch.tensor([text.rstrip(" ").endswith((".", "!", "?", "\n")) for text in texts])
    return flags


def merge_caches(caches: list, masks: list[torch.Tensor], backbone: Backbone):
    """One cache (and attention mask) from several batches' caches: each is left-padded to the
    longest with masked slots, so every row keeps its own positions and sees only its own tokens."""
    if len(caches) == 1:
        return caches[0], masks[0]
    length = max(m.shape[1] for m in masks)
    merged = new_cache(backbone.config.text_config)
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for cache in caches:
            k, v = cache.layers[layer].keys, cache.layers[layer].values
            pad = length - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        merged.update(torch.cat(keys), torch.cat(values), layer)
    mask = torch.cat([torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in masks])
    return merged, mask
