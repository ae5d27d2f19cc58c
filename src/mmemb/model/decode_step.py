"""One decoding step as pure tensor work on a static cache, so that it compiles to one graph.

The step feeds one token per row at the cache's current slot through the model's own modules
(embedding, rotary, norms, projections, MLP, LM head: every Qwen-VL family, LoRA adapters
included), with the attention written out over the static cache; keeps the last-layer state of
rows that feed their finishing token; and chooses every row's next token (greedy or sampled, with
the budget's forced close). Everything happens in place on fixed-shape tensors, with no host reads,
so ``torch.compile`` traces it once and a CUDA graph can replay it. Vectors equal the eager
forward's to float rounding (tests/test_compiled_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .backbone import Backbone, at_least_fp32
from .kv_cache import StaticKVCache

NO_LIMIT = 2 ** 62


@dataclass
class StopRule:
    """What a decode writes and how a row ends.

    The embedding protocol: rationale tokens are written; ``</think>`` closes (by the model, or
    forced at the budget), ``<emb>`` is fed right after it, and feeding ``<emb>`` finishes the row
    (its hidden state is the embedding). Plain text (a teacher writing rationales): a stop token
    closes and finishes the row at once (``then`` is None).
    """

    banned: torch.Tensor  # (V,) bool: never chosen
    written: torch.Tensor  # (V,) bool: fed tokens that are part of the text
    finishes: torch.Tensor  # (V,) bool: feeding one ends the row
    sentence_end: torch.Tensor  # (V,) bool: a written token that ends a sentence (a reasoning step)
    close: int  # forced when the budget is spent
    then: int | None  # fed right after ``close``

    def to(self, device) -> "StopRule":
        return StopRule(*(getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                          else getattr(self, f.name) for f in fields(self)))


@dataclass
class SamplingConfig:
    max_tokens: int = 128  # rationale tokens before </think> is forced
    max_steps: int | None = None  # sentences before </think> is forced (reasoning depth)
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def limits(self) -> "Limits":
        return Limits(self.max_tokens, NO_LIMIT if self.max_steps is None else self.max_steps, self.temperature,
                      self.top_k)

    def uniform(self, n: int, device) -> torch.Tensor | None:
        """One draw per row for sampling (None when greedy), from the caller's generator."""
        return torch.rand(n, generator=self.generator).to(device) if self.temperature > 0 else None


@dataclass
class Limits:
    """The budget: text tokens, and sentences, before ``close`` is forced; the sampling temperature."""

    max_tokens: torch.Tensor | int
    max_steps: torch.Tensor | int
    temperature: torch.Tensor | float
    top_k: int | None = None


def choose(logits: torch.Tensor, banned: torch.Tensor, limits: Limits, uniform: torch.Tensor | None) -> torch.Tensor:
    """Each row's next token: greedy where ``uniform`` is None or the temperature is 0, else a draw
    from softmax(logits / temperature) (top-k where set), by inverting its CDF at ``uniform`` (one
    number in [0, 1) per row). Both in one graph, so greedy and sampled decoding share a compilation."""
    logits = logits.masked_fill(banned, float("-inf"))
    greedy = logits.argmax(dim=-1)
    if uniform is None:
        return greedy
    temperature = torch.as_tensor(limits.temperature, dtype=logits.dtype, device=logits.device)
    scaled = logits / temperature.clamp(min=1e-6)
    if limits.top_k:
        kth = torch.topk(scaled, limits.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
    drawn = (cdf < uniform.unsqueeze(-1).to(cdf.dtype) * cdf[:, -1:]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    return torch.where(temperature > 0, drawn, greedy)


def next_feed(logits, closing, n_tokens, n_steps, rule: StopRule, limits: Limits, uniform):
    """Each row's next token and whether the budget forced it: ``close`` once the budget is spent,
    ``then`` right after ``close``."""
    feed = choose(logits, rule.banned, limits, uniform)
    over = (n_tokens >= limits.max_tokens) | (n_steps >= limits.max_steps)
    forced = over & ~closing & (feed != rule.close)
    feed = torch.where(forced, torch.full_like(feed, rule.close), feed)
    if rule.then is not None:
        feed = torch.where(closing, torch.full_like(feed, rule.then), feed)
    return feed, forced


@dataclass
class DecodeState:
    """Per-row decoding state, updated in place by :func:`decode_step` (all (B,) unless noted)."""

    feed: torch.Tensor  # long: the token fed at the next step
    pos: torch.Tensor  # long: its RoPE position
    n_tokens: torch.Tensor  # long: text tokens written
    n_steps: torch.Tensor  # long: sentences written
    done: torch.Tensor  # bool: fed its finishing token
    forced: torch.Tensor  # bool: the budget closed it
    uniform: torch.Tensor  # float: this step's sampling draw
    tokens: torch.Tensor  # (B, L) long: the token written at each cache slot, -1 where none
    hidden: torch.Tensor  # (B, D) the last-layer state where the row finished

    @classmethod
    def empty(cls, batch: int, length: int, width: int, dtype: torch.dtype, device) -> "DecodeState":
        def longs():
            return torch.zeros(batch, dtype=torch.long, device=device)

        return cls(longs(), longs(), longs(), longs(), torch.ones(batch, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.bool, device=device), torch.zeros(batch, device=device),
                   torch.full((batch, length), -1, dtype=torch.long, device=device),
                   torch.zeros(batch, width, dtype=dtype, device=device))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def start(self, feed: torch.Tensor, pos: torch.Tensor) -> None:
        """The first ``len(feed)`` rows start afresh; the other (padding) rows count as finished."""
        n = feed.numel()
        for t in (self.n_tokens, self.n_steps, self.pos, self.feed):
            t.zero_()
        self.feed[:n], self.pos[:n] = feed, pos
        self.done.fill_(True)
        self.done[:n] = False
        self.forced.zero_()
        self.tokens.fill_(-1)

    def copy_rows(self, other: "DecodeState", rows: torch.Tensor) -> None:
        """``other``'s ``rows`` become this state's first rows; the rest are finished padding."""
        n = rows.numel()
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine[:n] = theirs[rows]
        self.done[n:] = True


class CompileUnavailable(RuntimeError):
    """The compiled step cannot run here (torch.compile failed, or a model it does not cover): decode eagerly."""


class StepModel:
    """The parts of a backbone one decoding step uses."""

    def __init__(self, backbone: Backbone):
        self.text = backbone.core.language_model
        self.lm_head = backbone.lm_head
        rope = getattr(self.text.rotary_emb, "rope_type", "default")
        if rope != "default":  # others rescale their frequencies with the length, per call
            raise CompileUnavailable(f"the compiled step covers the default rotary embedding, not {rope!r}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer_step(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache,
                index: int, span: int, hide: torch.Tensor) -> torch.Tensor:
    """One decoder layer for one token per row, written out: attention reads the first ``span``
    slots of the static cache (``hide`` masks those a row may not see) as grouped-query attention
    without repeating the keys. The submodules (norms, projections, MLP) are the layer's own, so
    adapters apply."""
    attn = layer.self_attn
    batch = hidden.shape[0]
    dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, 1, -1, dim)
    k = attn.k_proj(x).view(batch, 1, -1, dim)
    v = attn.v_proj(x).view(batch, 1, -1, dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, 1, dim)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    keys, values = cache.update(k, v, index)  # (B, kv_heads, L, dim)
    keys, values = keys[:, :, :span], values[:, :, :span]
    kv_heads = keys.shape[1]
    q = q.reshape(batch, kv_heads, -1, 1, dim)  # the query heads of each key/value head, together
    # One query per row: products and sums rather than batched matrix products of one row each,
    # which the compiler fuses into one pass over the cache.
    scores = (q * keys.unsqueeze(2)).sum(-1) * attn.scaling  # (B, kv_heads, group, L)
    scores = scores.masked_fill(hide, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    out = (probs.unsqueeze(-1) * values.unsqueeze(2)).sum(-2).reshape(batch, 1, -1)
    hidden = hidden + attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def decode_step(model: StepModel, cache: StaticKVCache, state: DecodeState, rule: StopRule, limits: Limits,
                span: torch.Tensor) -> None:
    """Feed ``state.feed`` at ``cache.slot`` and advance every row by one token, in place. Attention
    reads the first ``len(span)`` slots (at least ``slot + 1``): a tensor's length, so that it is a
    dynamic size of the compiled graph rather than a constant."""
    feed, active = state.feed, ~state.done
    hidden = model.text.embed_tokens(feed).unsqueeze(1)
    cache.valid.index_fill_(1, cache.slot, True)
    # Text tokens after the prompt sit at the same position on the t, h and w axes, where the
    # model's multimodal rotary (sectioned or interleaved) is one plain rotation at each row's
    # position, which carries the prompt's image offsets: computed as the model's rotary computes
    # each axis, from its own frequencies.
    rotary = model.text.rotary_emb
    freqs = state.pos.view(-1, 1).float() * rotary.inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1).view(-1, 1, 1, 2 * freqs.shape[-1])
    cos = (angles.cos() * rotary.attention_scaling).to(hidden.dtype)
    sin = (angles.sin() * rotary.attention_scaling).to(hidden.dtype)
    span_len = span.shape[0]
    hide = ~cache.valid[:, :span_len].view(cache.batch, 1, 1, span_len)
    for index, layer in enumerate(model.text.layers):
        hidden = _layer_step(layer, hidden, cos, sin, cache, index, span_len, hide)
    hidden = model.text.norm(hidden)[:, 0]

    written = active & rule.written[feed]
    state.tokens.index_copy_(1, cache.slot, torch.where(written, feed, -1).unsqueeze(1))
    state.n_tokens.add_(written.long())
    state.n_steps.add_((written & rule.sentence_end[feed]).long())
    finished = active & rule.finishes[feed]
    state.hidden.copy_(torch.where(finished.unsqueeze(1), hidden.to(state.hidden.dtype), state.hidden))
    state.done.logical_or_(finished)
    logits = at_least_fp32(model.lm_head(hidden))
    nxt, forced = next_feed(logits, feed == rule.close, state.n_tokens, state.n_steps, rule, limits, state.uniform)
    state.forced.logical_or_(forced & ~state.done)
    state.feed.copy_(nxt)
    state.pos.add_(1)
    cache.slot.add_(1)
