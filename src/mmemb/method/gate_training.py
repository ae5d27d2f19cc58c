"""Training the plug-in reasoning gate on the counterfactual selection's labels.

The gate (``mmemb.model.gate``) learns p(reason) from the prompt's layer-0 features; its labels
are the selection's verdicts (``reason`` / ``direct``) per training pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..items import Pair, load_visuals
from ..model.backbone import Backbone
from ..model.gate import GateConfig, ReasoningGate, gate_features
from ..model.prompts import render_prompt


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
