"""The plug-in reasoning gate: a small transformer that decides, per query, whether to reason.

It reads what the backbone's first layer would read — the prompt's token embeddings, with the
vision tower's features in place of the image tokens — projects it to a small width, runs a
2-layer, 4-head transformer encoder and pools to one logit: p(reason). Trained on the
counterfactual selection's labels (``reason`` / ``direct``), it replaces the model's own
first-token decision (``Embedder(backbone, gate=gate)``), so pipelines that cannot run RL — or
that wrap a model they cannot retrain — still get selective reasoning.

This module is the inference half (the module, its features, save / load); training lives in
``mmemb.method.gate_training``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import atomic_dir, read_json, write_json
from .backbone import Backbone


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
