"""The plug-in reasoning gate: a small transformer that decides, per query, whether to reason.

It reads what the backbone's first layer would read — the prompt's token embeddings, with the
vision tower's features in place of the image tokens — projects it to a small width, runs a
2-layer, 4-head transformer encoder and pools to one logit: p(reason). Trained on the
counterfactual selection's labels (``reason`` / ``direct``), it replaces the model's own
first-token decision (``Embedder(backbone, gate=gate)``), so pipelines that cannot run RL — or
that wrap a model they cannot retrain — still get selective reasoning.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..backbone import Backbone
from ..fileio import atomic_dir, read_json, write_json
from ..items import Pair, load_visuals
from ..prompts import render_prompt


@dataclass
class GateConfig:
    input_dim: int
    width: int = 64
    layers: int = 2
    heads: int = 4
    max_len: int = 512
    dropout: float = 0.1


class ReasoningGate(nn.Module):
    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.input_dim, config.width)
        self.pos = nn.Embedding(config.max_len, config.width)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, config.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, L, input_dim), mask (B, L) of real tokens -> logits (B,)."""
        # Positions count real tokens, so left padding (batch composition) changes nothing.
        pos = (mask.long().cumsum(1) - 1).clamp(min=0, max=self.config.max_len - 1)
        h = self.proj(features) + self.pos(pos)
        h = self.encoder(h, src_key_padding_mask=~mask.bool())
        h = self.norm(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def p_think(self, prompts: Sequence[str], visuals: Sequence[tuple], backbone: Backbone) -> list[float]:
        features, mask = gate_features(backbone, prompts, visuals)
        return self.p_think_features(features, mask)

    @torch.no_grad()
    def p_think_features(self, features: torch.Tensor, mask: torch.Tensor) -> list[float]:
        self.eval()
        return torch.sigmoid(self(features.to(self.proj.weight.dtype), mask)).cpu().tolist()

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            write_json(tmp / "gate_config.json", asdict(self.config))
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / "gate.safetensors")


def load_gate(path: str | Path) -> ReasoningGate:
    path = Path(path)
    gate = ReasoningGate(GateConfig(**read_json(path / "gate_config.json")))
    gate.load_state_dict(load_file(path / "gate.safetensors"))
    return gate.eval()


@torch.no_grad()
def gate_features(backbone: Backbone, prompts: Sequence[str], visuals: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's layer-0 inputs for the prompts: token embeddings, image features in place."""
    inputs = backbone.prepare(list(prompts), list(visuals))
    backbone.encode_visuals(inputs)
    return backbone.layer0_embeddings(inputs).float(), inputs["attention_mask"]


@dataclass
class GateTrainConfig:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    val_share: float = 0.2
    seed: int = 0


def train_gate(backbone: Backbone, pairs: Sequence[Pair], config: GateTrainConfig | None = None,
               gate_config: GateConfig | None = None, show_progress: bool = False) -> tuple[ReasoningGate, dict]:
    """Fit the gate on labelled pairs (``pair.label``); return it and held-out metrics."""
    cfg = config or GateTrainConfig()
    labelled = [p for p in pairs if p.label in ("reason", "direct")]
    if len(labelled) < 10:
        raise ValueError(f"the gate needs labelled pairs; got {len(labelled)}")
    rng = random.Random(cfg.seed)
    labelled = labelled[:]
    rng.shuffle(labelled)
    n_val = max(1, int(len(labelled) * cfg.val_share))
    val, train = labelled[:n_val], labelled[n_val:]
    torch.manual_seed(cfg.seed)
    gate = ReasoningGate(gate_config or GateConfig(input_dim=backbone.hidden_size))
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=0.01)
    # Plain (unweighted) cross-entropy keeps p(reason) calibrated: the threshold means what it says.
    feats_train = _featurize(backbone, train, cfg.batch_size)
    from tqdm.auto import trange

    for _ in trange(cfg.epochs, desc="gate", disable=not show_progress):
        gate.train()
        order = list(range(len(feats_train)))
        rng.shuffle(order)
        for i in order:
            x, m, y = feats_train[i]
            loss = F.binary_cross_entropy_with_logits(gate(x, m), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    metrics = evaluate_gate(gate, _featurize(backbone, val, cfg.batch_size))
    metrics.update(train_pairs=len(train), val_pairs=len(val))
    return gate.eval(), metrics


@torch.no_grad()
def evaluate_gate(gate: ReasoningGate, batches) -> dict:
    gate.eval()
    preds, labels = [], []
    for x, m, y in batches:
        preds.append(torch.sigmoid(gate(x, m)) >= 0.5)
        labels.append(y.bool())
    p, y = torch.cat(preds), torch.cat(labels)
    return {"accuracy": float((p == y).float().mean()), "reason_share_true": float(y.float().mean()),
            "reason_share_predicted": float(p.float().mean()),
            "recall_reason": float((p & y).sum() / y.sum().clamp(min=1)),
            "recall_direct": float((~p & ~y).sum() / (~y).sum().clamp(min=1))}


def _featurize(backbone: Backbone, pairs: Sequence[Pair], batch_size: int):
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        x, m = gate_features(backbone, [render_prompt(backbone.processor, p.query) for p in chunk],
                             [load_visuals(p.query) for p in chunk])
        y = torch.tensor([1.0 if p.label == "reason" else 0.0 for p in chunk])
        out.append((x, m, y))
    return out
