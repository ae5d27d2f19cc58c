"""Teachers: where candidate rationales come from.

A teacher turns a batch of training queries into K candidate rationales each. Specs:

  minimmeb[:faithful=0.4,misread=0.2,slip=0.2,format_only=0.2]   MiniMMEB's benchmark teacher
  local:PATH[?temperature=0.8&max_tokens=96]                     a local Qwen-VL checkpoint (mmemb's decoder)
  openai:BASE_URL#MODEL[?concurrency=8&timeout=60&retries=4]     an OpenAI-compatible chat endpoint
  vllm:PATH[?tensor_parallel=1]                                   vLLM's offline engine (optional extra)

The endpoint's API key is read from the environment (``MMEMB_TEACHER_API_KEY``, else
``OPENAI_API_KEY``), never from the spec.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence
from urllib.parse import parse_qsl

from ..items import Item, Pair, image_to_data_url, load_visuals

TEACHER_SYSTEM = (
    "You help a retrieval model. Given a query, write short step-by-step reasoning (at most three "
    "short sentences) about what the query shows and asks, that would help find its matching target. "
    "Do not write anything after the reasoning."
)


@dataclass
class Candidate:
    text: str
    tokens: int | None = None  # the teacher's own count, when it reports one
    type: str | None = None  # known rationale type (benchmark teacher only)


class Teacher(Protocol):
    id: str
    sampling: dict[str, Any]

    def generate(self, pairs: Sequence[Pair], k: int) -> list[list[Candidate]]: ...


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``kind:target?key=value&...`` -> (kind, target, options)."""
    kind, _, rest = spec.partition(":")
    target, _, query = rest.partition("?")
    if kind == "minimmeb" and target and "=" in target and not query:  # minimmeb:faithful=0.5,...
        target, query = "", target.replace(",", "&")
    return kind, target, dict(parse_qsl(query))


def make_teacher(spec: str, seed: int = 0) -> Teacher:
    kind, target, opts = parse_spec(spec)
    if kind == "minimmeb":
        return MiniMMEBTeacher({k: float(v) for k, v in opts.items()} or None, seed)
    if kind == "local":
        return LocalTeacher(target, temperature=float(opts.get("temperature", 0.8)),
                            max_tokens=int(opts.get("max_tokens", 96)), seed=seed)
    if kind == "openai":
        base, _, model = target.partition("#")
        if not base or not model:
            raise ValueError("openai teacher spec is openai:BASE_URL#MODEL")
        return EndpointTeacher(base, model, temperature=float(opts.get("temperature", 0.8)),
                               max_tokens=int(opts.get("max_tokens", 96)),
                               concurrency=int(opts.get("concurrency", 8)), timeout=float(opts.get("timeout", 60)),
                               retries=int(opts.get("retries", 4)))
    if kind == "vllm":
        return VLLMTeacher(target, temperature=float(opts.get("temperature", 0.8)),
                           max_tokens=int(opts.get("max_tokens", 96)),
                           tensor_parallel=int(opts.get("tensor_parallel", 1)), seed=seed)
    raise ValueError(f"unknown teacher kind {kind!r} in {spec!r} (minimmeb, local, openai, vllm)")


class MiniMMEBTeacher:
    """Rationales of known type from each pair's ground truth (see mmemb.data.minimmeb_teacher)."""

    def __init__(self, proportions: dict[str, float] | None = None, seed: int = 0):
        from ..data.minimmeb_teacher import TeacherConfig

        self.proportions = proportions or TeacherConfig().proportions
        self.seed = seed
        self.id = "minimmeb"
        self.sampling = {"proportions": self.proportions, "seed": seed}

    def generate(self, pairs: Sequence[Pair], k: int) -> list[list[Candidate]]:
        from ..data.minimmeb_teacher import candidate_rationales

        out = []
        for pair in pairs:
            if "digits" not in pair.meta:
                raise ValueError(f"pair {pair.id}: the minimmeb teacher needs MiniMMEB pairs (meta.digits)")
            rng = random.Random(f"{self.seed}/{pair.id}")  # per pair: reruns give the same candidates
            out.append([Candidate(text, type=kind) for kind, text in
                        candidate_rationales(pair.meta, k, self.proportions, rng)])
        return out


def teacher_messages(item: Item, image_urls: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A chat asking for short reasoning about the query (OpenAI content-part format)."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    text = " ".join(x for x in (item.instruction, item.text) if x)
    parts.append({"type": "text", "text": text or "Describe what matters in this query."})
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": parts}]


def clean_rationale(text: str) -> str:
    """Keep the reasoning: the inside of <think>...</think> when a thinking model writes it."""
    m = re.search(r"<think>(.*?)(</think>|$)", text, flags=re.S)
    text = m.group(1) if m else text
    return " ".join(text.replace("<emb>", " ").split())


class LocalTeacher:
    """A local Qwen-VL checkpoint (what :func:`mmemb.model.backbone.load_backbone` loads), sampled on
    mmemb's own decoder: each query's prompt is prefilled once and its cache shared by the k samples,
    and the tokens come from the compiled decoding step (``compile=False``: the eager loop)."""

    def __init__(self, path: str, temperature: float = 0.8, max_tokens: int = 96, seed: int = 0,
                 device: str = "cpu", batch_size: int = 8, compile: bool | None = None):
        from ..model.backbone import load_backbone
        from ..model.generation import Reasoner

        self.backbone = load_backbone(path, device=device)
        self.reasoner = Reasoner(self.backbone, compile=compile)
        self.id = f"local:{os.path.basename(os.path.normpath(path))}"
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        self.temperature, self.max_tokens, self.seed, self.batch_size = temperature, max_tokens, seed, batch_size

    def generate(self, pairs: Sequence[Pair], k: int) -> list[list[Candidate]]:
        import torch

        from ..model.generation import SamplingConfig
        from ..model.prefix_cache import prefill

        bb = self.backbone
        out: list[list[Candidate]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            texts, visuals = [], []
            for pair in chunk:
                imgs, _ = load_visuals(pair.query)
                msgs = teacher_messages(pair.query, ["x"] * len(imgs))
                for part in msgs[1]["content"]:  # local chat templates take {"type": "image"}
                    if part["type"] == "image_url":
                        part.clear()
                        part["type"] = "image"
                texts.append(bb.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
                visuals.append((imgs, None))
            state = prefill(bb, texts, visuals)
            state = state.repeat(torch.arange(len(chunk), device=bb.device).repeat_interleave(k))
            sampling = SamplingConfig(max_tokens=self.max_tokens, temperature=self.temperature,
                                      generator=torch.Generator().manual_seed(self.seed + start))
            result = self.reasoner.run([state.cache], [state.mask], state.next_pos, state.logits, sampling,
                                       first_is_logits=True, text=True)
            decoded = bb.tokenizer.batch_decode(result.tokens, skip_special_tokens=False)
            for q in range(len(chunk)):
                out.append([Candidate(clean_rationale(decoded[q * k + j]), tokens=len(result.tokens[q * k + j]))
                            for j in range(k)])
        return out


class EndpointTeacher:
    """An OpenAI-compatible /chat/completions endpoint (vLLM, or any other) with images as data URLs."""

    def __init__(self, base_url: str, model: str, temperature: float = 0.8, max_tokens: int = 96,
                 concurrency: int = 8, timeout: float = 60.0, retries: int = 4, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or os.environ.get("MMEMB_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.id = f"openai:{model}"
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens}
        self.temperature, self.max_tokens = temperature, max_tokens
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries

    def generate(self, pairs: Sequence[Pair], k: int) -> list[list[Candidate]]:
        return asyncio.run(self._generate(pairs, k))

    async def _generate(self, pairs: Sequence[Pair], k: int) -> list[list[Candidate]]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=headers) as client:
            async def one(pair: Pair) -> list[Candidate]:
                imgs, _ = load_visuals(pair.query)
                body = {"model": self.model, "messages": teacher_messages(pair.query, [image_to_data_url(i) for i in imgs]),
                        "n": k, "temperature": self.temperature, "max_tokens": self.max_tokens}
                async with sem:
                    data = await self._post(client, body)
                choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
                per = (data.get("usage") or {}).get("completion_tokens")
                return [Candidate(clean_rationale(c["message"]["content"] or ""),
                                  tokens=None if per is None else per // max(1, len(choices))) for c in choices[:k]]
            return list(await asyncio.gather(*(one(p) for p in pairs)))

    async def _post(self, client, body: dict) -> dict:
        import httpx

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = await client.post(f"{self.base_url}/chat/completions", json=body)
                if r.status_code == 429 or r.status_code >= 500:
                    raise httpx.HTTPStatusError(f"status {r.status_code}", request=r.request, response=r)
                r.raise_for_status()
                return r.json()
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                retryable = not isinstance(e, httpx.HTTPStatusError) or e.response.status_code in (429,) \
                    or e.response.status_code >= 500
                if attempt == self.retries or not retryable:
                    raise RuntimeError(f"teacher endpoint {self.base_url} failed: {e}") from None
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")


class VLLMTeacher:
    """vLLM's offline engine (``pip install mmemb[vllm]``); not needed by the tests."""

    def __init__(self, path: str, temperature: float = 0.8, max_tokens: int = 96, tensor_parallel: int = 1,
                 seed: int = 0):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise RuntimeError("the vllm teacher needs vLLM: pip install 'mmemb[vllm]'") from e
        self.llm = LLM(model=path, tensor_parallel_size=tensor_parallel, seed=seed)
        self.params = SamplingParams
        self.id = f"vllm:{os.path.basename(os.path.normpath(path))}"
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        self.temperature, self.max_tokens = temperature, max_tokens

    def generate(self, pairs: Sequence[Pair], k: int) -> list[list[Candidate]]:
        conversations = []
        for pair in pairs:
            imgs, _ = load_visuals(pair.query)
            conversations.append(teacher_messages(pair.query, [image_to_data_url(i) for i in imgs]))
        params = self.params(n=k, temperature=self.temperature, max_tokens=self.max_tokens)
        results = self.llm.chat(conversations, params)
        return [[Candidate(clean_rationale(o.text), tokens=len(o.token_ids)) for o in r.outputs] for r in results]
