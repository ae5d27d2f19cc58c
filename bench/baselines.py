"""The peers' ways of reading a reasoning embedding, on our model, our items and our greedy rationales.

generate  (UME-R1 style) transformers' ``model.generate(..., output_hidden_states=True,
          return_dict_in_generate=True)`` writes <think>'s continuation: the rationale, </think>,
          <emb> and one more token; the embedding is the last layer's state of the step that fed <emb>.
two_pass  (Think-then-Embed style) ``model.generate`` writes the rationale up to </think>; a second
          full forward over prompt + <think> + rationale + </think> + <emb> reads the state at <emb>.

Both follow the rationales our reason mode wrote (a logits processor lets each row choose only the
next token of its sequence), so they do the same tokens' work as ours and their vectors can be
compared with ours. Items go in batches of the same size and length order as ``Embedder.encode``.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmemb.items import as_items, load_visuals
from mmemb.model.embedder import _length_key
from mmemb.model.prompts import THINK, render_prompt
from mmemb.model.teacher_forcing import build_forced_batch


class FollowTokens(LogitsProcessor):
    """Row i may only choose ``sequences[i][t]`` at generated step t (``fill`` once it has run out)."""

    def __init__(self, sequences: list[list[int]], prompt_length: int, fill: int):
        self.sequences, self.prompt_length, self.fill = sequences, prompt_length, fill

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_length
        chosen = torch.tensor([s[t] if t < len(s) else self.fill for s in self.sequences], device=scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen), device=scores.device), chosen] = 0.0
        return out


def _batches(embedder, items, rationales, batch_size):
    """(prompts, visuals, rationales) per batch, in the order Embedder.encode would batch them."""
    bb = embedder.backbone
    prepared = [(render_prompt(bb.processor, it), load_visuals(it), r) for it, r in zip(as_items(items), rationales)]
    order = sorted(range(len(prepared)), key=lambda i: -_length_key(prepared[i][0], prepared[i][1]))
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        yield rows, [prepared[i][0] for i in rows], [prepared[i][1] for i in rows], [prepared[i][2] for i in rows]


def _generate(embedder, prompts, visuals, sequences, stop: int, hidden_states: bool):
    bb = embedder.backbone
    inputs = bb.prepare([p + THINK for p in prompts], visuals)
    prompt_length = inputs["input_ids"].shape[1]
    return prompt_length, bb.hf_model.generate(
        **inputs, max_new_tokens=max(len(s) for s in sequences), do_sample=False,
        logits_processor=LogitsProcessorList([FollowTokens(sequences, prompt_length, stop)]),
        eos_token_id=stop, pad_token_id=bb.ids.pad, output_hidden_states=hidden_states,
        return_dict_in_generate=True)


@torch.no_grad()
def generate_baseline(embedder, items, rationales: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """UME-R1's reading: the hidden states ``generate`` returns, at the step that fed <emb>."""
    ids = embedder.backbone.ids
    stop = ids.stop[0]
    out = np.zeros((len(rationales), embedder.dim), np.float32)
    for rows, prompts, visuals, rats in _batches(embedder, items, rationales, batch_size):
        _, gen = _generate(embedder, prompts, visuals, [[*r, ids.end_think, ids.emb, stop] for r in rats], stop, True)
        # hidden_states[k] is the step whose input is generated token k-1; <emb> is token len(r) + 1
        states = torch.stack([gen.hidden_states[len(r) + 2][-1][i, -1] for i, r in enumerate(rats)])
        out[rows] = torch.nn.functional.normalize(states.float(), dim=-1).cpu().numpy()
    return out


@torch.no_grad()
def two_pass_baseline(embedder, items, rationales: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """Think-then-Embed's reading: generate the trace, then one more full forward over everything."""
    bb = embedder.backbone
    ids = bb.ids
    out = np.zeros((len(rationales), embedder.dim), np.float32)
    for rows, prompts, visuals, rats in _batches(embedder, items, rationales, batch_size):
        prompt_length, gen = _generate(embedder, prompts, visuals, [[*r, ids.end_think] for r in rats], ids.end_think,
                                       False)
        traces = [[t for t in seq[prompt_length:].tolist() if t != ids.pad][:-1] for seq in gen.sequences]
        batch = build_forced_batch(bb, prompts, visuals, traces)
        hidden = bb(batch.inputs, batch.positions).hidden[:, -1]  # rows end in <emb> (left padding)
        out[rows] = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu().numpy()
    return out
