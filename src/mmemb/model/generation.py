"""Batched reasoning on the KV cache, ending at the <emb> token.

After the prompt is prefilled, each row writes its rationale one token per step on the same
cache, closes it with </think> (by itself, or forced at the budget) and feeds <emb>; the
hidden state at that step is the row's embedding. Nothing is prefilled twice.

Two ways to run the steps, with the same tokens and vectors (to float rounding):

* compiled (the default): the prefill's cache is copied into a static one sized to the budget and
  one compiled step runs per token (replayed as a CUDA graph on a GPU), with no per-step Python
  beyond that call (:mod:`.static_decoder`);
* eager (``compile=False``, and the fallback where torch.compile fails): the model's own forward
  per step on the growing cache; rows that finish leave the batch.

The same loops write plain text for teachers (``text=True``): a stop token ends a row.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .backbone import Backbone
from .decode_step import CompileUnavailable, SamplingConfig, StopRule, next_feed
from .kv_cache import new_cache
from .static_decoder import StaticDecoder


@dataclass
class ReasoningResult:
    embeddings: torch.Tensor  # (B, D), not normalised
    tokens: list[list[int]]  # per row: rationale token ids (without <think>, </think>)
    closed_by_model: list[bool]  # False where the budget forced </think>



def compile_by_default() -> bool:
    """Whether reasoning decodes with the compiled step when the caller does not say:
    ``MMEMB_COMPILE=0`` makes the eager loop the default everywhere (where no C++ compiler is at
    hand, or where a short-lived process would spend longer compiling than decoding)."""
    return os.environ.get("MMEMB_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")

class Reasoner:
    """Decodes rationales for a batch whose cache already holds prompt (+ <think>).

    ``compile``: run the compiled step on a static cache (see the module docstring); False runs
    the eager loop; None (the default) follows ``$MMEMB_COMPILE`` (on unless it is 0). Where
    compilation fails, the eager loop runs instead, with one warning.
    """

    def __init__(self, backbone: Backbone, compile: bool | None = None):
        self.backbone = backbone
        self.compile = compile_by_default() if compile is None else compile
        self._static = None
        ids = backbone.ids
        vocab = backbone.lm_head.weight.shape[0]
        special = torch.zeros(vocab, dtype=torch.bool)
        special[[i for i in ids.special if i < vocab]] = True
        special[len(backbone.tokenizer):] = True  # unused rows of a padded vocabulary
        self.banned = special.clone()
        self.banned[ids.end_think] = False
        self.ends_sentence = _sentence_end_ids(backbone.tokenizer, vocab)
        finishes = torch.zeros(vocab, dtype=torch.bool)
        finishes[ids.emb] = True
        # The embedding protocol, and plain text up to a stop token (what a teacher writes: only
        # <emb> and the rows past the tokenizer are banned; the budget forces the first stop token).
        stops = torch.zeros_like(special)
        stops[ids.stop] = True
        text_banned = torch.zeros_like(special)
        text_banned[len(backbone.tokenizer):] = True
        text_banned[ids.emb] = True
        self.rules = {"embedding": StopRule(self.banned, ~special, finishes, self.ends_sentence, ids.end_think, ids.emb),
                      "text": StopRule(text_banned, ~stops, stops, self.ends_sentence, ids.stop[0], None)}
        self._on_device: dict[tuple[str, str], StopRule] = {}

    def rule(self, name: str, device) -> StopRule:
        """A rule's tensors on ``device``, moved once: a CUDA graph keeps reading the same ones."""
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = self.rules[name].to(device)
        return self._on_device[key]

    @torch.no_grad()
    def run(
        self,
        caches: list,
        masks: list[torch.Tensor],
        next_pos: torch.Tensor,
        first: torch.Tensor,
        sampling: SamplingConfig,
        first_is_logits: bool,
        text: bool = False,
    ) -> ReasoningResult:
        """Decode until every row has fed <emb> (``text``: plain text until a stop token).

        ``caches`` / ``masks``: the prefill caches of one or more batches and their (left-padded)
        attention masks; their rows decode together, in order. ``first`` is either the next-token
        logits after the prefill (``first_is_logits``) or the token ids to feed first (e.g. <think>
        after a decision step). ``next_pos`` is the RoPE position of the first token to be fed, per
        row. The compiled path only reads the caches; the eager path grows them.
        """
        name = "text" if text else "embedding"
        rule = self.rule(name, masks[0].device)
        if self.compile:
            try:
                if self._static is None:
                    self._static = StaticDecoder(self.backbone)
                hidden, tokens, closed = self._static.run(caches, masks, next_pos, first, first_is_logits, rule, name,
                                                          sampling)
                return ReasoningResult(hidden, tokens, closed)
            except CompileUnavailable as e:
                warnings.warn(f"decoding eagerly from now on (compile=False): {e}", RuntimeWarning, stacklevel=2)
                self.compile = False
        cache, mask = merge_caches(caches, masks, self.backbone)
        return self._run_eager(cache, mask, next_pos, first, sampling, first_is_logits, rule)

    def _run_eager(self, cache, attention_mask, next_pos, first, sampling: SamplingConfig, first_is_logits: bool,
                   rule: StopRule) -> ReasoningResult:
        bb = self.backbone
        device = attention_mask.device
        B = attention_mask.shape[0]
        limits = sampling.limits()
        rows = torch.arange(B, device=device)  # original row of each active row
        n_tokens = torch.zeros(B, dtype=torch.long, device=device)
        n_steps = torch.zeros(B, dtype=torch.long, device=device)
        closing = torch.zeros(B, dtype=torch.bool, device=device)  # fed the closing token: ``then`` comes next
        tokens: list[list[int]] = [[] for _ in range(B)]
        closed_by_model = [True] * B
        out = torch.zeros(B, bb.hidden_size, dtype=torch.float32, device=device)
        mask, pos = attention_mask, next_pos.clone()
        logits = first if first_is_logits else None
        feed = None if first_is_logits else first
        while rows.numel():
            if feed is None:
                feed, forced = next_feed(logits, closing, n_tokens, n_steps, rule, limits,
                                         sampling.uniform(rows.numel(), device))
                for r in rows[forced].tolist():
                    closed_by_model[r] = False
            written = rule.written[feed]
            for r, tok, text in zip(rows.tolist(), feed.tolist(), written.tolist()):
                if text:
                    tokens[r].append(tok)
            n_tokens += written.long()
            n_steps += (written & rule.sentence_end[feed]).long()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_inputs = {"input_ids": feed.view(-1, 1), "attention_mask": mask}
            positions = pos.view(1, -1, 1).expand(3, -1, 1)
            result = bb(step_inputs, positions, cache=cache, logits_index=(torch.arange(feed.numel(), device=device),
                                                                           torch.zeros_like(feed)))
            pos = pos + 1
            done = rule.finishes[feed]
            closing = feed == rule.close
            logits = result.logits
            feed = None
            if done.any():
                out[rows[done]] = result.hidden[done, -1].float()
                keep = torch.nonzero(~done).flatten()
                cache.batch_select_indices(keep)
                rows, mask, pos, closing, logits = rows[keep], mask[keep], pos[keep], closing[keep], logits[keep]
                n_tokens, n_steps = n_tokens[keep], n_steps[keep]
        return ReasoningResult(out, tokens, closed_by_model)


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
