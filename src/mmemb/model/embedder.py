"""``Embedder.encode``: items in, L2-normalised vectors out, reasoning only where asked or chosen.

Modes:
  direct  one forward over prompt + <emb>.
  reason  prefill prompt + <think>, write the rationale on the cache, close it, feed <emb>.
  auto    one forward over prompt + <emb>; p(<think>) is read at the last prompt position. Rows
          under the threshold keep the <emb> they already have (exactly the cost of direct mode);
          the others drop that one cache slot and continue with <think> on the same cache.
          With a plug-in gate, the gate decides before the prefill instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..defaults import BATCH_SIZE, CORPUS_MODE, DEFAULT_MODE, DEFAULT_ON_ERROR, MAX_REASONING_TOKENS, THINK_THRESHOLD
from ..items import DEFAULT_MAX_IMAGE_PIXELS, ImageError, Item, ItemError, as_items, check_text, load_visuals
from .backbone import Backbone, load_backbone
from .generation import Reasoner, SamplingConfig
from .kv_cache import new_cache
from .prompts import EMB, THINK
from .protocols import Protocol, detect_protocol, get_protocol, peer_vectors
from .vllm_engine import VLLMReasoner, check_engine, require_vllm

MODES = ("direct", "reason", "auto")
# The user-facing reasoning switch (server requests, search) -> the encode mode.
REASONING_MODES = {"auto": "auto", "always": "reason", "never": "direct"}
WINDOW_BATCHES = 16  # batches whose images are held in memory at once
# Reasoning rows pooled from several prefill batches decode together: a decoding step costs about
# the same for 8 rows as for 200 on small models, so pooling amortises it (KV caches grow with it).
MAX_DECODE_ROWS = 256


@dataclass
class Encoded:
    """The result of :meth:`Embedder.encode`, aligned with the input items.

    Items that failed (``on_error="skip"``) have ``ok[i] == False``, an all-zero vector and an
    entry in ``errors``.
    """

    embeddings: np.ndarray  # (N, D) float32, L2-normalised (unless encode(normalize_embeddings=False))
    reasoned: np.ndarray  # (N,) bool
    rationales: list[str | None]
    rationale_token_ids: list[list[int] | None]  # exactly what the model wrote between <think> and </think>
    p_think: np.ndarray  # (N,) float: the decision probability p(<think>) vs p(<emb>)
    prompt_tokens: np.ndarray  # (N,) int
    generated_tokens: np.ndarray  # (N,) int: <think> ... </think> (0 in direct mode)
    ok: np.ndarray  # (N,) bool
    errors: list[ItemError] = field(default_factory=list)
    seconds: float = 0.0
    tokens_processed: int = 0  # every token position the model computed

    def __len__(self) -> int:
        return len(self.embeddings)

    def summary(self) -> str:
        n = len(self)
        share = float(self.reasoned[self.ok].mean()) if self.ok.any() else 0.0
        return (f"{n} items ({int((~self.ok).sum())} failed), {share:.1%} reasoned, "
                f"{int(self.prompt_tokens.sum())} prompt + {int(self.generated_tokens.sum())} generated tokens, "
                f"{self.seconds:.2f}s")


class Embedder:
    """Embeds items with a backbone; optional plug-in gate for the think / no-think decision.

    ``protocol`` is the embedding convention (:mod:`mmemb.model.protocols`): mmemb's own, or a
    peer's (``vlm2vec``, ``qwen3-vl-embedding``, ``ume-r1``) to evaluate its released checkpoint.
    ``compile``: reasoning decodes with the compiled step (False: the eager loop; None: as
    ``$MMEMB_COMPILE`` says, on by default).
    ``engine``: what writes rationales, "hf" (this model) or "vllm" (a vLLM engine over the same
    checkpoint; the embedding still comes from this model), checked here: a missing vLLM or GPU
    fails now, not at the first request.
    """

    def __init__(self, backbone: Backbone, gate: Any = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 protocol: str | Protocol = "mmemb", compile: bool | None = None, engine: str = "hf"):
        check_engine(engine)
        self.backbone = backbone
        self.gate = gate
        self.max_image_pixels = max_image_pixels
        self.protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        self.compile = compile
        self.engine = engine
        self._reasoner: Reasoner | None = None
        self._vllm: VLLMReasoner | None = None
        if engine == "vllm":
            self.vllm_reasoner()

    @classmethod
    def from_pretrained(cls, path: str, gate: Any = "auto", protocol: str = "auto", **opts) -> "Embedder":
        """Load a checkpoint folder (see :func:`mmemb.model.backbone.load_backbone` for options).

        ``gate``: ``"auto"`` (default) uses a plug-in gate saved in ``<path>/gate`` if there is one;
        a folder path loads the gate saved there; None: no gate; or a gate object.
        ``protocol="auto"`` reads the convention from the folder's tokenizer files
        (:func:`~mmemb.model.protocols.detect_protocol`).
        """
        from .backbone import tokenizer_folder

        max_image_pixels = opts.pop("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        compile = opts.pop("compile", None)
        engine = opts.pop("engine", "hf")
        check_engine(engine)
        if engine == "vllm":
            require_vllm()  # before the weights load
        if protocol == "auto":
            folder = Path(tokenizer_folder(path))
            resolved = detect_protocol(folder) if folder.is_dir() else get_protocol("mmemb")
        else:
            resolved = get_protocol(protocol)
        backbone = load_backbone(path, add_tokens=resolved.name == "mmemb", **opts)
        if gate == "auto":
            gate = Path(path) / "gate" if (Path(path) / "gate").is_dir() else None
        if isinstance(gate, (str, Path)):
            from .gate import load_gate

            gate = load_gate(gate)
        return cls(backbone, gate=gate, max_image_pixels=max_image_pixels, protocol=resolved, compile=compile,
                   engine=engine)

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    @property
    def reasoner(self) -> Reasoner:
        if self._reasoner is None:
            self._reasoner = Reasoner(self.backbone, compile=self.compile)
        return self._reasoner

    def vllm_reasoner(self) -> VLLMReasoner:
        if self._vllm is None:
            self._vllm = VLLMReasoner(self.backbone, self.reasoner.banned, self.reasoner.ends_sentence)
        return self._vllm

    def encode(
        self,
        items: Iterable[Any],
        mode: str = DEFAULT_MODE,
        batch_size: int = BATCH_SIZE,
        max_reasoning_tokens: int = MAX_REASONING_TOKENS,
        max_reasoning_steps: int | None = None,
        think_threshold: float = THINK_THRESHOLD,
        temperature: float = 0.0,
        show_progress: bool = False,
        on_error: str = DEFAULT_ON_ERROR,
        *,
        instruction: str | None = None,
        prompt: str | None = None,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = True,
        truncate_dim: int | None = None,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        engine: str | None = None,
    ) -> "Encoded | np.ndarray | torch.Tensor":
        """Embed items (Items, strings, images, JSON-like dicts); returns an :class:`Encoded`.

        The keywords follow sentence-transformers' ``encode``: ``instruction`` (or its alias
        ``prompt``) is the task instruction of items that bring none; ``show_progress_bar`` is
        ``show_progress``; ``normalize_embeddings=False`` returns the raw ``<emb>`` hidden states;
        ``truncate_dim`` keeps the first dimensions (re-normalised: Matryoshka-trained models);
        ``convert_to_numpy`` / ``convert_to_tensor`` return just the vectors as an array / tensor
        (one vector for a single string, as sentence-transformers does). ``engine``: what writes
        the rationales, "hf" or "vllm" (default: the embedder's own).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        mode = self.protocol.resolve_mode(mode)
        engine = engine or self.engine
        check_engine(engine)
        if engine == "vllm" and mode != "direct":
            self.vllm_reasoner()  # a missing vLLM or GPU fails before any work
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if truncate_dim is not None and not 1 <= truncate_dim <= self.dim:
            raise ValueError(f"truncate_dim must be between 1 and {self.dim}, not {truncate_dim}")
        if prompt is not None and instruction is not None and prompt != instruction:
            raise ValueError("give the instruction once: prompt is an alias of instruction")
        single = isinstance(items, str)
        show = show_progress if show_progress_bar is None else show_progress_bar
        instruction = instruction if instruction is not None else prompt
        res = self._encode(as_items(items), mode, batch_size, max_reasoning_tokens, max_reasoning_steps,
                           think_threshold, temperature, show, on_error, instruction, engine)
        res.embeddings = finish_vectors(res.embeddings, truncate_dim, normalize_embeddings)
        if convert_to_tensor or convert_to_numpy:
            out = res.embeddings[0] if single else res.embeddings
            return torch.from_numpy(out) if convert_to_tensor else out
        return res

    def encode_query(self, items: Iterable[Any], **kw: Any) -> "Encoded | np.ndarray | torch.Tensor":
        """Encode queries: ``mode`` defaults to the query side's (auto: the model decides)."""
        return self.encode(items, **{"mode": DEFAULT_MODE, **kw})

    def encode_document(self, items: Iterable[Any], **kw: Any) -> "Encoded | np.ndarray | torch.Tensor":
        """Encode a corpus (documents, candidates): ``mode`` defaults to the corpus side's (direct)."""
        return self.encode(items, **{"mode": CORPUS_MODE, **kw})

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        """Cosine similarities (len(a), len(b)) of two sets of vectors (arrays, tensors, Encoded, or
        single vectors), as sentence-transformers' ``similarity``."""
        a, b = _as_matrix(a), _as_matrix(b)
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def _encode(self, items: list[Item], mode: str, batch_size: int, max_reasoning_tokens: int,
                max_reasoning_steps: int | None, think_threshold: float, temperature: float, show_progress: bool,
                on_error: str, instruction: str | None, engine: str) -> Encoded:
        start = time.perf_counter()
        if instruction is not None:
            items = [it if it.instruction is not None else replace(it, instruction=instruction) for it in items]
        n, dim = len(items), self.dim
        res = Encoded(
            embeddings=np.zeros((n, dim), np.float32), reasoned=np.zeros(n, bool), rationales=[None] * n,
            rationale_token_ids=[None] * n,
            p_think=np.zeros(n, np.float32), prompt_tokens=np.zeros(n, np.int64),
            generated_tokens=np.zeros(n, np.int64), ok=np.zeros(n, bool),
        )
        sampling = SamplingConfig(max_tokens=max_reasoning_tokens, max_steps=max_reasoning_steps, temperature=temperature)

        # Images are opened one window at a time (bounded memory); within a window, similar
        # lengths go together (less padding; results do not depend on it).
        window = batch_size * WINDOW_BATCHES
        was_training = self.backbone.training
        self.backbone.eval()
        bar = tqdm(total=n, desc=f"encode ({mode})", disable=not show_progress, unit="item")
        try:
            for w0 in range(0, n, window):
                prepared: list[tuple[int, str, tuple]] = []
                for i in range(w0, min(n, w0 + window)):
                    try:
                        check_text(items[i])
                        prepared.append((i, self.protocol.render(self.backbone.processor, items[i], mode),
                                         load_visuals(items[i], self.max_image_pixels)))
                    except (ImageError, ItemError) as e:
                        self._fail(res, i, items[i], e, on_error)
                prepared.sort(key=lambda p: -_length_key(p[1], p[2]))
                pool: list[_Pending] = []  # reasoning rows of several batches decode together
                for b0 in range(0, len(prepared), batch_size):
                    batch = prepared[b0:b0 + batch_size]
                    pool += self._prefill_safely(items, batch, mode, think_threshold, res, on_error, sampling)
                    if sum(p.rows for p in pool) >= max(batch_size, MAX_DECODE_ROWS):
                        self._decode(pool, sampling, res, engine)
                        pool = []
                    bar.update(len(batch))
                if pool:
                    self._decode(pool, sampling, res, engine)
                bar.update(min(n, w0 + window) - w0 - len(prepared))
        finally:
            bar.close()
            self.backbone.train(was_training)
        res.seconds = time.perf_counter() - start
        return res

    # ---- internals -------------------------------------------------------------------------
    def _fail(self, res: Encoded, i: int, item: Item, err: Exception, on_error: str) -> None:
        reason = err.reason if isinstance(err, ItemError) else str(err)
        error = ItemError(i, item.id, reason)
        if on_error == "raise":
            raise error from None
        res.errors.append(error)

    def _prefill_safely(self, items, batch, mode, threshold, res, on_error, sampling) -> list["_Pending"]:
        try:
            if self.protocol.name != "mmemb":
                self._embed_peer(batch, mode, res, sampling)
                return []
            pending = self._prefill(batch, mode, threshold, res)
            return [pending] if pending is not None else []
        except (ValueError, RuntimeError) as e:
            if len(batch) == 1:
                self._fail(res, batch[0][0], items[batch[0][0]], e, on_error)
                return []
            # isolate the item that broke the batch; the others still get their vectors
            return [p for one in batch for p in self._prefill_safely(items, [one], mode, threshold, res, on_error,
                                                                       sampling)]

    @torch.no_grad()
    def _prefill(self, batch, mode: str, threshold: float, res: Encoded) -> "_Pending | None":
        """One forward over the batch: direct vectors and decisions written; reasoning rows returned."""
        bb = self.backbone
        idx = [b[0] for b in batch]
        prompts = [b[1] for b in batch]
        visuals = [b[2] for b in batch]
        gate_p = None
        inputs = bb.prepare([p + (THINK if mode == "reason" else EMB) for p in prompts], visuals)
        if mode == "auto" and self.gate is not None:
            # The gate decides before the prefill. It reads the prompts' layer-0 inputs (the last token
            # is the placeholder for the decision), sharing the one vision pass with the prefill.
            bb.encode_visuals(inputs)
            gate_p = self.gate.p_think_features(bb.layer0_embeddings(inputs)[:, :-1].float(),
                                                inputs["attention_mask"][:, :-1])
            chosen = [bb.ids.think if p >= threshold else bb.ids.emb for p in gate_p]
            inputs["input_ids"][:, -1] = torch.tensor(chosen, device=bb.device)
        positions, next_pos = bb.rope_positions(inputs)
        B, L = inputs["input_ids"].shape
        rows = torch.arange(B, device=bb.device)
        cache = new_cache(bb.config.text_config) if mode != "direct" else None
        # Logits at the last prompt position (the decision) and at the last position (what follows).
        index = (torch.cat([rows, rows]), torch.cat([torch.full_like(rows, L - 2), torch.full_like(rows, L - 1)]))
        out = bb(inputs, positions, cache=cache, logits_index=index)
        decision_logits, next_logits = out.logits[:B], out.logits[B:]
        p_think = bb.ids.p_think(decision_logits)
        if gate_p is not None:
            p_think = torch.as_tensor(gate_p, dtype=torch.float32, device=bb.device)
        think = torch.full((B,), mode == "reason", dtype=torch.bool, device=bb.device)
        if mode == "auto":
            think = p_think >= threshold
        mask = inputs["attention_mask"]
        res.tokens_processed += int(mask.sum())
        emb = out.hidden[:, -1].float().cpu().numpy()  # raw: normalised at the end of encode
        # One transfer each, not one per row (each would wait for the device).
        res.embeddings[idx] = emb  # reasoning rows are overwritten once decoded
        res.reasoned[idx] = think.cpu().numpy()
        res.p_think[idx] = p_think.float().cpu().numpy()
        res.prompt_tokens[idx] = (mask.sum(dim=1) - 1).cpu().numpy()
        res.ok[idx] = True
        if not think.any():
            return None
        sel = torch.nonzero(think).flatten()
        rows_idx = [idx[r] for r in sel.tolist()]
        sources = [(prompts[r], visuals[r]) for r in sel.tolist()]
        if mode == "reason" or gate_p is not None:
            # The prefill ends in <think>: continue from its logits.
            cache.batch_select_indices(sel)
            return _Pending(cache, mask[sel], next_pos[sel], next_logits[sel], True, rows_idx, sources)
        # The prefill ends in <emb>: drop that slot, feed <think> in its place.
        cache.crop(-1)
        cache.batch_select_indices(sel)
        first = torch.full((sel.numel(),), bb.ids.think, dtype=torch.long, device=bb.device)
        return _Pending(cache, mask[sel, :-1], next_pos[sel] - 1, first, False, rows_idx, sources)

    @torch.no_grad()
    def _embed_peer(self, batch, mode: str, res: Encoded, sampling: SamplingConfig) -> None:
        """A peer's vectors for one batch (its own pooling; reason mode writes first where it has one)."""
        idx = [b[0] for b in batch]
        out = peer_vectors(self.backbone, self.protocol, [b[1] for b in batch], [b[2] for b in batch], mode,
                           sampling.max_tokens)
        res.embeddings[idx] = out.vectors.cpu().numpy()
        res.prompt_tokens[idx] = out.mask.sum(dim=1).cpu().numpy()
        res.tokens_processed += int(out.mask.sum())
        res.ok[idx] = True
        for i, written in zip(idx, out.written or []):
            res.reasoned[i] = True
            res.rationales[i] = self.backbone.tokenizer.decode(written, skip_special_tokens=True).strip()
            res.rationale_token_ids[i] = written
            res.generated_tokens[i] = len(written)
            res.tokens_processed += len(written)

    @torch.no_grad()
    def _decode(self, pool: list["_Pending"], sampling: SamplingConfig, res: Encoded, engine: str) -> None:
        """Decode the pooled reasoning rows of several prefills together, on their caches."""
        caches, masks = [p.cache for p in pool], [p.mask for p in pool]
        next_pos = torch.cat([p.next_pos for p in pool])
        logits_first = pool[0].first_is_logits
        if engine == "vllm":
            result = self.vllm_reasoner().run(caches, masks, next_pos, logits_first,
                                              [s for p in pool for s in p.sources], sampling)
        else:
            result = self.reasoner.run(caches, masks, next_pos, torch.cat([p.first for p in pool]), sampling,
                                       logits_first)
        rows = [i for p in pool for i in p.items]
        emb = result.embeddings.float().cpu().numpy()  # raw: normalised at the end of encode
        texts = self.backbone.tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
        for k, i in enumerate(rows):
            res.embeddings[i] = emb[k]
            res.rationales[i] = texts[k].strip()
            res.rationale_token_ids[i] = result.tokens[k]
            res.generated_tokens[i] = len(result.tokens[k]) + 2  # <think> ... </think>
            # rationale + </think> + <emb>, plus <think> where the prefill ended in <emb>
            res.tokens_processed += len(result.tokens[k]) + (2 if logits_first else 3)


@dataclass
class _Pending:
    """Reasoning rows of one prefill, waiting to decode: their cache and where they stand."""

    cache: Any
    mask: torch.Tensor
    next_pos: torch.Tensor
    first: torch.Tensor  # next-token logits (prefill ended in <think>) or the token ids to feed first
    first_is_logits: bool
    items: list[int]
    sources: list[tuple[str, tuple]]  # each row's rendered prompt and visuals (for engine="vllm")

    @property
    def rows(self) -> int:
        return len(self.items)


def finish_vectors(vectors: np.ndarray, truncate_dim: int | None = None, normalize: bool = True) -> np.ndarray:
    """Keep the first ``truncate_dim`` dimensions (Matryoshka) and L2-normalise (all-zero rows stay zero)."""
    if truncate_dim is not None:
        vectors = vectors[:, :truncate_dim]
    if normalize:
        vectors = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(vectors)), dim=-1).numpy()
    return vectors


def _as_matrix(x: Any) -> torch.Tensor:
    if isinstance(x, Encoded):
        x = x.embeddings
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return t.unsqueeze(0) if t.dim() == 1 else t


def _length_key(prompt: str, visuals: tuple) -> int:
    images, frames = visuals
    pixels = sum(im.width * im.height for im in images) + sum(f.width * f.height for f in frames or [])
    return len(prompt) + pixels // 64

