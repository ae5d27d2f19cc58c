"""Teacher-forced passes over whole assistant turns, with gradients: the unit of training.

Every training signal of the method comes from one forward over ``prompt + assistant turn``:

    direct rows:  prompt <emb>
    reason rows:  prompt <think> r_1 ... r_n </think> <emb>

From it: the embedding at <emb>; the decision logits (<think> vs <emb>) at the last prompt
position; and the log-probability of each rationale token and of </think> (next-token loss,
GRPO). Selection (counterfactual utility) and RL use the same pass without gradients.
The pass goes through ``model(...)`` (a :class:`~mmemb.model.backbone.Backbone`, possibly wrapped by
DDP/FSDP), so every parameter it uses is used inside one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backbone import Backbone, at_least_fp32


@dataclass
class ForcedBatch:
    inputs: dict[str, torch.Tensor]
    positions: torch.Tensor  # (3, B, L)
    reason: torch.Tensor  # (B,) bool: the row carries a rationale
    decision_pos: torch.Tensor  # (B,) the position whose next token is the first assistant token
    target_row: torch.Tensor  # (N,) row of each next-token target (rationale tokens and </think>)
    target_pos: torch.Tensor  # (N,) position whose logits predict it
    target_ids: torch.Tensor  # (N,) the target token

    @property
    def size(self) -> int:
        return self.reason.numel()


@dataclass
class ForcedOutput:
    embeddings: torch.Tensor  # (B, D) L2-normalised, float32
    decision_logits: torch.Tensor  # (B, 2): [<think>, <emb>]
    target_logprobs: torch.Tensor  # (N,) log p(target) under the full vocabulary (or the constrained one)
    target_row: torch.Tensor  # (N,)

    def decision_logprob(self, reason: torch.Tensor) -> torch.Tensor:
        """log p(first token) over {<think>, <emb>} for the given choice per row."""
        logp = torch.log_softmax(self.decision_logits, dim=-1)
        return torch.where(reason, logp[:, 0], logp[:, 1])

    def rationale_logprob_sum(self, n_rows: int) -> torch.Tensor:
        """Sum of the rationale (+ </think>) token log-probs per row; 0 for direct rows."""
        out = torch.zeros(n_rows, dtype=self.target_logprobs.dtype, device=self.target_logprobs.device)
        return out.index_add(0, self.target_row, self.target_logprobs)


def rationale_ids(backbone: Backbone, text: str) -> list[int]:
    """Token ids of a rationale as it is written between <think> and </think>."""
    return backbone.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]


def build_forced_batch(
    backbone: Backbone,
    prompts: Sequence[str],
    visuals: Sequence[tuple[list[Any], list[Any] | None]],
    rationales: Sequence[list[int] | None],
) -> ForcedBatch:
    """Tokenize prompts (with their images), append each row's assistant turn, left-pad.

    ``rationales[i]`` is a list of token ids (a reason row, possibly empty) or None (direct row).
    """
    ids = backbone.ids
    prompt_batch = backbone.prepare(list(prompts), list(visuals))
    tails = [[ids.emb] if r is None else [ids.think, *r, ids.end_think, ids.emb] for r in rationales]
    inputs = append_tails(prompt_batch, tails, ids.pad)
    L = inputs["input_ids"].shape[1]
    B = len(tails)
    device = inputs["input_ids"].device
    positions, _ = backbone.rope_positions(inputs)

    reason = torch.tensor([r is not None for r in rationales], device=device)
    decision_pos = torch.full((B,), L - 2, dtype=torch.long)
    t_row, t_pos, t_ids = [], [], []
    for b, r in enumerate(rationales):
        if r is None:
            continue
        think_at = L - len(r) - 3  # <think> r... </think> <emb> end the row
        decision_pos[b] = think_at - 1
        for k, tok in enumerate([*r, ids.end_think]):
            t_row.append(b)
            t_pos.append(think_at + k)
            t_ids.append(tok)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ForcedBatch(inputs, positions, reason, decision_pos.to(device), as_long(t_row), as_long(t_pos), as_long(t_ids))


def append_tails(prompt_batch: dict[str, torch.Tensor], tails: Sequence[list[int]], pad: int
                 ) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts with each row's token ids appended (text tokens), left-padded again."""
    mask = prompt_batch["attention_mask"].bool()
    types = prompt_batch.get("mm_token_type_ids")
    rows_ids = [prompt_batch["input_ids"][b][mask[b]].tolist() + list(tail) for b, tail in enumerate(tails)]
    L, B = max(len(r) for r in rows_ids), len(rows_ids)
    device = prompt_batch["input_ids"].device
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    token_types = torch.zeros((B, L), dtype=prompt_batch["input_ids"].dtype)
    for b, row in enumerate(rows_ids):
        input_ids[b, L - len(row):] = torch.tensor(row)
        attention[b, L - len(row):] = 1
        if types is not None:
            token_types[b, L - len(row):] = torch.tensor(types[b][mask[b]].tolist() + [0] * len(tails[b]))
    inputs = {k: v for k, v in prompt_batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    inputs.update(input_ids=input_ids.to(device), attention_mask=attention.to(device))
    if types is not None:
        inputs["mm_token_type_ids"] = token_types.to(device)
    return inputs


def forced_forward(model: Any, backbone: Backbone, batch: ForcedBatch, banned: torch.Tensor | None = None,
                   temperature: float = 1.0) -> ForcedOutput:
    """One forward through ``model`` (the backbone or its DDP/FSDP wrapper).

    ``banned`` (a vocabulary mask) and ``temperature`` give the rationale tokens' log-probs under
    the distribution they were sampled from, for RL; by default they are over the full
    vocabulary at temperature 1 (the next-token loss).
    """
    B = batch.size
    rows = torch.arange(B, device=batch.decision_pos.device)
    index = (torch.cat([rows, batch.target_row]), torch.cat([batch.decision_pos, batch.target_pos]))
    out = model(batch.inputs, batch.positions, logits_index=index)
    decision = out.logits[:B][:, [backbone.ids.think, backbone.ids.emb]]
    target_logits = out.logits[B:] / temperature
    if banned is not None:
        target_logits = target_logits.masked_fill(banned.to(target_logits.device), float("-inf"))
    target_logprobs = torch.log_softmax(target_logits, dim=-1).gather(1, batch.target_ids.view(-1, 1)).flatten()
    emb = F.normalize(at_least_fp32(out.hidden[:, -1]), dim=-1)
    return ForcedOutput(emb, decision, target_logprobs, batch.target_row)
