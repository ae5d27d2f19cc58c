"""Rationales from vLLM, embeddings from mmemb's own forward: ``engine="vllm"``.

vLLM (continuous batching, paged attention, prefix caching) has no merged way to return the hidden
state after generated tokens in the same request. So reasoning rows take two steps: vLLM writes
each rationale from the prompt + <think> under the same rules as mmemb's decoder (the same banned
tokens, the budget, the sentence limit, greedy or sampled), then the rationale, </think> and <emb>
are fed on the prefill's KV cache in one batched forward of the project's model
(:func:`mmemb.model.prefix_cache.embed_tails`); the last-layer state at <emb> is the embedding.
The prompt is not encoded twice by mmemb's model; vLLM encodes it once more for itself.

Needs ``pip install 'mmemb[vllm]'`` and a CUDA GPU; both are checked up front with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .backbone import Backbone
from .generation import ReasoningResult, SamplingConfig, merge_caches
from .prefix_cache import Prefilled, embed_tails
from .prompts import THINK

ENGINES = ("hf", "vllm")
GPU_MEMORY_SHARE = 0.5  # of the GPU for vLLM's weights and paged cache; mmemb's own model needs the rest
MAX_IMAGES_PER_PROMPT = 16


class EngineUnavailable(RuntimeError):
    pass


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")


def require_vllm():
    """The vllm module, or a clear error saying what is missing (the package, or a GPU)."""
    try:
        import vllm
    except ImportError as e:
        raise EngineUnavailable("engine='vllm' needs vLLM: pip install 'mmemb[vllm]' (or use engine='hf')") from e
    if not torch.cuda.is_available():
        raise EngineUnavailable("engine='vllm' needs a CUDA GPU and none is visible here; use engine='hf'")
    return vllm


def trim(token_ids: Sequence[int], close: int, max_tokens: int, max_steps: int | None,
         ends_sentence: torch.Tensor) -> tuple[list[int], bool]:
    """vLLM's output (generated with ``max_tokens + 1`` and ``close`` as a stop token) cut where
    mmemb's decoder would force ``close``: after ``max_tokens`` tokens or the ``max_steps``-th
    sentence. Returns the rationale and whether the model closed it itself (False: forced)."""
    seq = list(token_ids)
    stopped = bool(seq) and seq[-1] == close
    text = seq[:-1] if stopped else seq
    cut = max_tokens
    if max_steps is not None:
        sentences = 0
        for i, tok in enumerate(text):
            sentences += bool(ends_sentence[tok])
            if sentences >= max_steps:
                cut = min(cut, i + 1)
                break
    if len(text) > cut:  # the model went on; mmemb's decoder would have forced the close here
        return text[:cut], False
    return text, stopped


class VLLMReasoner:
    """Writes rationales with a vLLM engine over the same checkpoint folder as ``backbone``."""

    def __init__(self, backbone: Backbone, banned: torch.Tensor, ends_sentence: torch.Tensor):
        vllm = require_vllm()
        source = backbone.source
        if source is None or not Path(source).is_dir():
            raise EngineUnavailable(f"engine='vllm' loads a local checkpoint folder, not {source!r}")
        if (Path(source) / "adapter_config.json").is_file():
            raise EngineUnavailable(f"{source} is a LoRA adapter: merge it into a full checkpoint for engine='vllm'")
        self.backbone = backbone
        self.ends_sentence = ends_sentence
        self.allowed = torch.nonzero(~banned).flatten().tolist()
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(backbone.dtype, "float32")
        self.vllm = vllm
        self.llm = vllm.LLM(model=source, tokenizer=source, dtype=dtype, seed=0, enable_prefix_caching=True,
                            gpu_memory_utilization=GPU_MEMORY_SHARE,
                            limit_mm_per_prompt={"image": MAX_IMAGES_PER_PROMPT, "video": 1})

    def run(self, caches: list, masks: list[torch.Tensor], next_pos: torch.Tensor, first_is_logits: bool,
            sources: list[tuple[str, Any]], sampling: SamplingConfig) -> ReasoningResult:
        """``sources``: each row's rendered prompt and loaded visuals; the caches end at the prompt
        (+ <think> where ``first_is_logits``)."""
        bb, ids = self.backbone, self.backbone.ids
        seed = None  # sampled rationales follow the caller's generator through vLLM's per-request seed
        if sampling.temperature > 0:
            seed = int(torch.randint(2 ** 31, (1,), generator=sampling.generator))
        params = self.vllm.SamplingParams(
            max_tokens=sampling.max_tokens + 1, temperature=sampling.temperature, top_k=sampling.top_k or -1,
            seed=seed, stop_token_ids=[ids.end_think], allowed_token_ids=self.allowed, skip_special_tokens=False)
        requests = []
        for prompt, (images, frames) in sources:
            request: dict[str, Any] = {"prompt": prompt + THINK}
            media = {k: v for k, v in (("image", images), ("video", frames)) if v}
            if media:
                request["multi_modal_data"] = media
            requests.append(request)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        tokens, closed = [], []
        for out in outputs:
            text, by_model = trim(out.outputs[0].token_ids, ids.end_think, sampling.max_tokens, sampling.max_steps,
                                  self.ends_sentence)
            tokens.append(text)
            closed.append(by_model)
        opening = [] if first_is_logits else [ids.think]
        tails = [[*opening, *t, ids.end_think, ids.emb] for t in tokens]
        cache, mask = merge_caches(caches, masks, bb)
        embeddings = embed_tails(bb, Prefilled(cache, mask, next_pos, None, None), tails, normalize=False)
        return ReasoningResult(embeddings, tokens, closed)
