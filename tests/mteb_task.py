"""A small MTEB image-to-text retrieval task built offline: scikit-learn's scanned digits retrieved
by their names (what `mteb` would download for a real task is built here in memory)."""

from __future__ import annotations

from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class DigitsToNames(AbsTaskRetrieval):
    QUERY = "Represent the given image for retrieval."
    DOCUMENT = "Represent the given caption."
    metadata = TaskMetadata(
        name="MmembDigitsToNames", type="Any2AnyRetrieval", category="i2t", modalities=["image", "text"],
        main_score="ndcg_at_10", description="Scanned handwritten digits retrieved by their names.",
        reference=None, dataset={"path": "NA", "revision": "NA"}, eval_splits=["test"], eval_langs=["eng-Latn"],
        date=("2024-01-01", "2024-01-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
        annotations_creators="derived", dialect=[], sample_creation="found", bibtex_citation="",
        prompt={"query": QUERY, "document": DOCUMENT})

    def rows(self, n: int = 12) -> tuple[list[Image.Image], list[str], list[int]]:
        """(query images, corpus texts, the corpus row each query's digit names)."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = [Image.fromarray((digits.images[i] * 16).astype("uint8")).convert("RGB").resize((32, 32))
                  for i in range(n)]
        return images, [f"a handwritten {w}" for w in WORDS], [int(digits.target[i]) for i in range(n)]

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        images, texts, labels = self.rows()
        split = RetrievalSplitData(
            queries=Dataset.from_dict({"id": [f"q{i}" for i in range(len(images))], "image": images}),
            corpus=Dataset.from_dict({"id": [f"d{k}" for k in range(len(texts))], "text": texts}),
            relevant_docs={f"q{i}": {f"d{label}": 1} for i, label in enumerate(labels)},
            top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True
