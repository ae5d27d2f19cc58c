"""Export a checkpoint as a sentence-transformers model folder (``SentenceTransformer(OUT)``).

sentence-transformers (v6) runs vision-language models through their chat template:
a ``Transformer`` module over the base model, then pooling. mmemb's *direct* embedding is exactly
that: the last-layer state at ``<emb>`` after the rendered prompt. The export is the checkpoint
(weights, tokenizer, processor) whose chat template puts mmemb's default instruction as the system
message when there is none and ``<emb>`` after the assistant header, then last-token pooling and
L2 normalisation. ``SentenceTransformer.encode(x, prompt=INSTRUCTION)`` gives
``Embedder.encode(x, mode="direct", instruction=INSTRUCTION)``.

What it cannot do: reason. sentence-transformers computes one forward pass and pools it; mmemb's
``reason`` and ``auto`` modes write a rationale first (generation on the KV cache), which no
sentence-transformers module does. Use mmemb itself (or its server) for those.

Needs the ``sentence-transformers`` package (``pip install mmemb[st]``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .backbone import load_backbone
from .prompts import DEFAULT_INSTRUCTION, EMB


def export_sentence_transformers(model: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Write ``out``: a folder that ``SentenceTransformer(out)`` loads (direct-mode embeddings)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(model, dtype=dtype)
    hf_model = backbone.model
    if hasattr(hf_model, "merge_and_unload"):  # a LoRA adapter: fold it into the weights
        hf_model = hf_model.merge_and_unload()
    processor = backbone.processor
    processor.chat_template = embedding_template(processor.chat_template)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as weights:
        hf_model.save_pretrained(weights, safe_serialization=True)
        processor.save_pretrained(weights)
        transformer = Transformer(weights, processing_kwargs={"chat_template": {"add_generation_prompt": True}})
        st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "lasttoken"),
                                          Normalize()])
        st.save(str(out))  # the weights are copied into OUT
    return out


def embedding_template(chat_template: str) -> str:
    """The model's chat template with mmemb's protocol around it: the default instruction as the
    system message when none is given, and ``<emb>`` after the generation prompt."""
    default_system = ("{%- if messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
                      f"'content': '{DEFAULT_INSTRUCTION}'}}] + messages %}}{{%- endif %}}")
    return default_system + chat_template + "{%- if add_generation_prompt %}" + EMB + "{%- endif %}"
