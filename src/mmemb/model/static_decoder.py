"""Decoding with the compiled step (:mod:`.decode_step`) on static caches: the loop around it.

The step is compiled with the batch and cache length marked dynamic, so one compilation serves
every call: a call with another batch composition reuses it (torch._dynamo's counters show no new
graph). On a CPU a decode allocates exactly the rows and slots it needs; when a quarter of its
rows have finished, the live ones move to a smaller cache (finished rows would cost as much
arithmetic as live ones). On a GPU the step is replayed as a CUDA graph, which needs fixed shapes
and addresses: rows are padded to a power of two and the cache to a length bucket (four per
octave), each (batch, length) workspace captures the step once and is kept for later calls, and
live rows move to a smaller workspace when they fit the next power of two.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .backbone import Backbone, at_least_fp32
from .decode_step import (
    CompileUnavailable,
    DecodeState,
    Limits,
    SamplingConfig,
    StepModel,
    StopRule,
    decode_step,
    next_feed,
)
from .kv_cache import StaticKVCache

KEEP_WORKSPACES = 8  # GPU workspaces kept per decoder; a call's shrink by halves, so they sum to ~2x the largest
CHECK_EVERY_GPU = 4  # steps between reads of which rows are done (each read waits for the device)
SHRINK_CPU = 0.75  # on a CPU, live rows move to a smaller cache once they are at most this share of it

SPAN_STEP_CPU = 32  # on a CPU, attention reads the filled slots rounded up to this (the rest is never read)

_compiled_step = None


# Graphs are cached per code object, and every model layout a process decodes with (architecture,
# LoRA or not, a peft adapter switched off for GRPO's reference) adds one: an evaluation of a dozen
# systems, or the test suite, passes dynamo's default limit of 8, past which a fullgraph compile fails.
RECOMPILE_LIMIT = 64


def compiled_step():
    """The decoding step compiled once per process (graphs are cached per code object anyway)."""
    global _compiled_step
    if _compiled_step is None:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        _compiled_step = torch.compile(decode_step, fullgraph=True, options={"size_asserts": False})
    return _compiled_step


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    return max(2, 1 << (n - 1).bit_length())


def length_bucket(n: int) -> int:
    """``n`` rounded up to a quarter of its octave (at least 16): at most 25 % of slots unused."""
    return _round_up(n, max(16, 1 << max(0, n.bit_length() - 3)))


class Workspace:
    """A static cache and its decoding state for one (batch, length), and, on a GPU, the CUDA graphs
    of the step over exactly these tensors (one per stop rule and top-k setting)."""

    def __init__(self, like, batch: int, length: int, width: int, dtype: torch.dtype, zeros: bool = True):
        self.cache = StaticKVCache.like(like, batch, length, zeros)
        device = self.cache.valid.device
        self.state = DecodeState.empty(batch, length, width, dtype, device)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # by (rule name, top-k)
        self.span = torch.empty(length, dtype=torch.bool, device=device)  # a GPU graph attends to every slot
        for t in [*self.cache.keys, *self.cache.values, self.cache.valid, *self.state.tensors(), self.span]:
            torch._dynamo.mark_dynamic(t, 0)
        for t in (self.cache.valid, self.state.tokens):
            torch._dynamo.mark_dynamic(t, 1)
        for t in [*self.cache.keys, *self.cache.values]:
            torch._dynamo.mark_dynamic(t, 2)

    @property
    def batch(self) -> int:
        return self.cache.batch

    def small_tensors(self) -> list[torch.Tensor]:
        """Everything a step changes other than keys and values (which it only rewrites idempotently)."""
        return [self.cache.valid, self.cache.slot, *self.state.tensors()]


class StaticDecoder:
    """Runs decodes for one backbone on bucketed workspaces with the compiled step."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.model = StepModel(backbone)
        self.workspaces: OrderedDict[tuple, Workspace] = OrderedDict()
        self.limits: Limits | None = None  # 0-d tensors, fixed addresses (CUDA graphs read them)
        self._pool = None

    def run(self, caches: list, masks: list[torch.Tensor], next_pos: torch.Tensor, first: torch.Tensor,
            first_is_logits: bool, rule: StopRule, rule_name: str, sampling: SamplingConfig
            ) -> tuple[torch.Tensor, list[list[int]], list[bool]]:
        """Decode until every row has fed a finishing token; returns each row's last-layer state there,
        its written tokens and whether it closed by itself (not forced by the budget). ``rule`` must
        stay the same tensors between calls with the same ``rule_name`` (CUDA graphs read them)."""
        n = sum(m.shape[0] for m in masks)
        prompt = max(m.shape[1] for m in masks)
        device = masks[0].device
        feeds = sampling.max_tokens + (2 if first_is_logits else 3)  # most tokens a row can feed
        wanted = sampling.limits()
        self._set_limits(wanted.max_tokens, wanted.max_steps, wanted.temperature, device)
        limits = Limits(*self.limits, top_k=wanted.top_k)
        graph_key = (rule_name, wanted.top_k)
        sample = sampling.temperature > 0
        cuda = device.type == "cuda"
        length = length_bucket(prompt + feeds) if cuda else prompt + feeds
        ws = self._workspace(caches[0], batch_bucket(n) if cuda else max(2, n), length)
        ws.cache.load(caches, masks)
        if first_is_logits:
            zeros = torch.zeros(n, dtype=torch.long, device=device)
            first, forced = next_feed(first, zeros.bool(), zeros, zeros, rule, limits, sampling.uniform(n, device))
        ws.state.start(first, next_pos)
        if first_is_logits:
            ws.state.forced[:n] = forced

        width = self.backbone.hidden_size
        hidden = torch.zeros(n, width, dtype=ws.state.hidden.dtype, device=device)
        tokens: list[list[int]] = [[] for _ in range(n)]
        closed = [True] * n
        rows = torch.arange(n, device=device)  # the caller's row of each live workspace row
        check = CHECK_EVERY_GPU if cuda else 1
        for step in range(feeds):
            if sample:
                ws.state.uniform.copy_(sampling.uniform(ws.batch, device))
            self._step(ws, limits, rule, graph_key, min(length, _round_up(prompt + step + 1, SPAN_STEP_CPU)))
            if (step + 1) % check and step + 1 < feeds:
                continue
            done = ws.state.done[:rows.numel()]
            live = torch.nonzero(~done).flatten()
            if live.numel() == 0:
                break
            smaller_batch = batch_bucket(live.numel()) if cuda else max(2, live.numel())
            if smaller_batch < ws.batch and (cuda or live.numel() <= SHRINK_CPU * ws.batch):
                finished = torch.nonzero(done).flatten()
                self._harvest(ws, finished, rows[finished], prompt, hidden, tokens, closed)
                smaller = self._workspace(caches[0], smaller_batch, length, zeros=False)
                smaller.cache.copy_rows(ws.cache, live)
                smaller.state.copy_rows(ws.state, live)
                ws, rows = smaller, rows[live]
        everything = torch.arange(rows.numel(), device=device)
        self._harvest(ws, everything, rows, prompt, hidden, tokens, closed)
        return hidden.float(), tokens, closed

    # ---- internals -------------------------------------------------------------------------
    def _set_limits(self, max_tokens: int, max_steps: int, temperature: float, device) -> None:
        if self.limits is None or self.limits[0].device != device:
            self.limits = (torch.zeros((), dtype=torch.long, device=device),
                           torch.zeros((), dtype=torch.long, device=device),
                           torch.zeros((), dtype=torch.float32, device=device))
        for t, value in zip(self.limits, (max_tokens, max_steps, temperature)):
            t.fill_(value)

    def _workspace(self, cache, batch: int, length: int, zeros: bool = True) -> Workspace:
        """A fresh workspace on a CPU (``zeros=False``: to be filled by ``copy_rows``); on a GPU a kept
        one (its CUDA graphs with it), else a new one kept."""
        dtype = at_least_fp32(torch.zeros((), dtype=self.backbone.dtype)).dtype
        if cache.layers[0].keys.device.type != "cuda":
            return Workspace(cache, batch, length, self.backbone.hidden_size, dtype, zeros)
        key = (batch, length)
        ws = self.workspaces.pop(key, None)
        if ws is None:
            ws = Workspace(cache, batch, length, self.backbone.hidden_size, dtype)
            while len(self.workspaces) >= KEEP_WORKSPACES:
                self.workspaces.popitem(last=False)
        self.workspaces[key] = ws  # most recently used last
        return ws

    def _call(self, ws: Workspace, limits: Limits, rule: StopRule, span: torch.Tensor) -> None:
        try:
            compiled_step()(self.model, ws.cache, ws.state, rule, limits, span)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            raise CompileUnavailable("torch.compile failed: " + " ".join(str(e).split())[:300]) from e

    def _step(self, ws: Workspace, limits: Limits, rule: StopRule, graph_key: tuple, span: int) -> None:
        """One step: on a CPU attending to the first ``span`` slots; on a GPU, a replay over all of them."""
        if ws.cache.valid.device.type != "cuda":
            span_tensor = torch.empty(span, dtype=torch.bool)
            torch._dynamo.mark_dynamic(span_tensor, 0)
            self._call(ws, limits, rule, span_tensor)
            return
        graph = ws.graphs.get(graph_key)
        if graph is None:
            graph = ws.graphs[graph_key] = self._capture(ws, limits, rule)
        graph.replay()

    def _capture(self, ws: Workspace, limits: Limits, rule: StopRule) -> "torch.cuda.CUDAGraph":
        """Capture the step over this workspace's tensors. The warm-up call (which compiles, and must
        not be captured) really runs a step, so the state it changes is put back before the capture."""
        saved = [t.clone() for t in ws.small_tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._call(ws, limits, rule, ws.span)
            for t, s in zip(ws.small_tensors(), saved):
                t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._call(ws, limits, rule, ws.span)
        return graph

    @staticmethod
    def _harvest(ws: Workspace, local: torch.Tensor, rows: torch.Tensor, prompt: int, hidden: torch.Tensor,
                 tokens: list[list[int]], closed: list[bool]) -> None:
        """Copy out the results of workspace rows ``local`` (the caller's ``rows``): one transfer each."""
        if local.numel() == 0:
            return
        hidden[rows] = ws.state.hidden[local]
        written = ws.state.tokens[local, prompt:].tolist()
        forced = ws.state.forced[local].tolist()
        for r, row_tokens, f in zip(rows.tolist(), written, forced):
            tokens[r] = [t for t in row_tokens if t >= 0]
            closed[r] = not f
