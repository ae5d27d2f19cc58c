"""One pipeline run's folder: where each stage's files live, and the helpers stages share."""

from __future__ import annotations

import random
from pathlib import Path

from ..data.pairs import read_pairs
from ..fileio import write_jsonl
from ..items import Pair
from .config import PipelineConfig


class Run:
    """Paths and shared helpers of one pipeline run."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = Path(cfg.out)

    @property
    def benchmark(self) -> Path:
        return Path(self.cfg.benchmark) if self.cfg.benchmark else self.root / "minimmeb"

    def model(self, stage: str) -> Path:
        return self.root / stage / "model"

    @property
    def start_model(self) -> Path:
        """Where the method starts: the given checkpoint, or the pretrained tiny backbone."""
        return Path(self.cfg.model) if self.cfg.model else self.model("pretrain")

    def pairs_dir(self, name: str) -> Path:
        return self.root / "pairs" / name

    def write_pairs(self, name: str, pairs: list[Pair]) -> Path:
        """One file per dataset (each is a dataset of the trainer's mixture); absolute image paths."""
        folder = self.pairs_dir(name)
        by_dataset: dict[str, list[dict]] = {}
        for p in pairs:
            by_dataset.setdefault(p.dataset, []).append(p.to_json())
        for dataset, rows in by_dataset.items():
            write_jsonl(folder / f"{dataset}.jsonl", rows)
        return folder

    def read_pairs(self, name: str) -> list[Pair]:
        return read_pairs(str(self.pairs_dir(name) / "*.jsonl"))

    @property
    def is_minimmeb(self) -> bool:
        return not self.cfg.train_data or self.cfg.eval_tasks.startswith("minimmeb")

    def load(self, model: Path, gate=None):
        from ..model.embedder import Embedder

        return Embedder.from_pretrained(str(model), gate=gate, device=self.cfg.device, dtype=self.cfg.dtype)

    def subset(self) -> list[Pair]:
        """The method's training pairs: ``method_pairs`` spread evenly over the datasets, seeded."""
        if not self.pairs_dir("subset").is_dir():
            pairs = read_pairs(self.cfg.train_data or self.benchmark)
            by_task: dict[str, list[Pair]] = {}
            for p in pairs:
                by_task.setdefault(p.dataset, []).append(p)
            rng = random.Random(self.cfg.seed)
            per_task = -(-self.cfg.method_pairs // len(by_task)) if self.cfg.method_pairs else None
            chosen = []
            for task in sorted(by_task):
                group = by_task[task]
                chosen += rng.sample(group, min(per_task, len(group))) if per_task else group
            self.write_pairs("subset", chosen)
        return self.read_pairs("subset")



def task_kinds(run: Run) -> dict[str, str]:
    from ..data.minimmeb import manifest

    return {t: v["kind"] for t, v in manifest(run.benchmark)["tasks"].items()}

