"""The MMEB-V2 task registry (78 tasks) and task selection for ``mmemb eval`` / ``mmemb tasks``.

Names, meta-tasks, metrics, ranking types and instructions follow VLM2Vec-V2's release
(TIGER-AI-Lab/VLM2Vec: ``experiments/public/eval/{image,video,visdoc}.yaml`` and the dataset
parsers under ``src/data/eval_dataset``), and so do where each task's data comes from: the
annotation dataset (``hub``: repository, config, split), the parser that reads it and the media
folder of a TIGER-Lab/MMEB-V2 download (``extra``; see :mod:`mmemb.data.mmeb_hub`). Image rows
carry their own instructions; the ones here are what those rows say (used when a row has none,
and to split an instruction off a v1-style ``qry_text``). Video and visual-document tasks have
fixed instructions, given here.

Ranking type: video classification on HMDB51, UCF101, K700 and Breakfast ranks against the full
label set (global); video text-to-video retrieval ranks against every test video and visual
documents rank against the whole page corpus (global too, as VLM2Vec-V2's configs set them);
everything else ranks its own candidate list (local), the positive first.

**MMEB-V3** (190 tasks: the 78 above, MCMR, 53 text, 47 agent and 11 audio tasks) is registered
from its public configs (VLM2Vec's MMEB-V3 branch: ``experiments/public/eval/*.yaml`` and
``experiments/report_score_v3.py``), kept in ``mmeb_v3_tasks.json``: names, categories, metrics
(NDCG@5 for text, as the MMEB-V3 paper reports it; Hit@1 for agent, MCMR and audio), ranking
types and each task's files under an MMEB-V3 download.

A ``minimmeb`` benchmark reads its tasks from a MiniMMEB folder's ``manifest.json``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..fileio import read_json

IMAGE, VIDEO, VISDOC = "image", "video", "visdoc"
HIT1, NDCG5 = "hit@1", "ndcg@5"
LOCAL, GLOBAL = "local", "global"


@dataclass(frozen=True)
class TaskInfo:
    """One benchmark task: what it is, how it is scored, and where its data comes from."""

    name: str
    modality: str  # image | video | visdoc
    meta_task: str  # e.g. classification, vqa, retrieval, grounding, qa, moment_retrieval, vidore_v1
    metric: str  # main metric: hit@1 | ndcg@5
    eval_type: str  # local | global
    qry_inst: str
    tgt_inst: str
    hub: tuple[str, str | None, str] | None = None  # (repo, config, split); visdoc: configs queries/corpus/qrels
    benchmark: str = "mmeb-v2"
    kind: str | None = None  # MiniMMEB: easy | compositional
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def group(self) -> str:
        """The meta-task group name usable in ``--tasks`` (e.g. ``image-classification``)."""
        return f"{self.modality}-{self.meta_task}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["group"] = self.group
        out.pop("extra")
        return out


# ---- image (36) -------------------------------------------------------------------------------
_IMAGE_HUB = "ziyjiang/MMEB_Test_Instruct"  # the rows VLM2Vec-V2's image parsers read (one config per task)

_VQA_INST = "Represent the given image with the following question:"
_CROP_TGT = "Represent the given cropped image of the object"

_IMAGE_TASKS = {
    # classification: the target is the bare label text
    "classification": [
        ("ImageNet-1K", "Represent the given image for classification", ""),
        ("N24News", "Represent the given news image with the following caption for domain classification:", ""),
        ("HatefulMemes", "Represent the given image for binary classification to determine whether it "
                         "constitutes hateful speech or not", ""),
        ("VOC2007", "Identify the object shown in the image", ""),
        ("SUN397", "Identify the scene shown in the image", ""),
        ("Place365", "Identify the scene shown in the image", ""),
        ("ImageNet-A", "Represent the given image for classification", ""),
        ("ImageNet-R", "Represent the given image for classification", ""),
        ("ObjectNet", "Identify the object shown in the image", ""),
        ("Country211", "Identify the country depicted in the image", ""),
    ],
    "vqa": [(name, _VQA_INST, "") for name in (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
        "TextVQA")],
    "retrieval": [
        ("VisDial", "Represent the given dialogue about an image, which is used for image retrieval:",
         "Represent the given image"),
        ("CIRR", "Given an image, find a similar everyday image with the described changes:",
         "Represent the given image."),
        ("VisualNews_t2i", "Retrieve an image of this news caption.", "Represent the given image."),
        ("VisualNews_i2t", "Find a caption for the news in the given photo.", ""),
        ("MSCOCO_t2i", "Find me an everyday image that matches the given caption:", "Represent the given image."),
        ("MSCOCO_i2t", "Find an image caption describing the given everyday image.", ""),
        ("NIGHTS", "Find a day-to-day image that looks similar to the provided image.", "Represent the given image."),
        ("WebQA", "Find a Wikipedia image that answers this question:",
         "Represent the given Wikipedia image with related text information:"),
        ("FashionIQ", "Find an image to match the fashion image and style note:", "Represent the given image."),
        ("Wiki-SS-NQ", "Find the document image that can answer the given query:", "Represent the given image"),
        ("OVEN", "Retrieve a Wikipedia image-description pair that provides evidence for the question of this image:",
         "Represent the given Wikipedia image with related text information:"),
        ("EDIS", "Find a news image that matches the provided caption:",
         "Represent the given image with related text information:"),
    ],
    "grounding": [
        # The released MSCOCO rows read "Crop the image to to isolate ..." (sic); rows carry their own text.
        ("MSCOCO", "Crop the image to to isolate the object labeled as", _CROP_TGT),
        ("RefCOCO", "Select the portion of the image that follows the language expressions.", _CROP_TGT),
        ("RefCOCO-Matching", "Select the portion of the image that follows the language expressions:",
         "Select the portion of the image that follows the language expressions:"),
        ("Visual7W-Pointing", "Select the portion of the image that answers the question", _CROP_TGT),
    ],
}

# ---- video (18) -------------------------------------------------------------------------------
_VIDEO_TGT = "Understand the content of the provided video."
_VIDEO_QA = ("Given a video and a question, select the most accurate answer from the provided candidates. "
             "Return only the exact text of your chosen answer. Question:")
_VIDEO_TASKS = {
    "classification": [
        ("K700", "Recognize the category of the video content.", "", GLOBAL),
        ("SmthSmthV2", "What actions or object interactions are being performed by the person in the video?", "",
         LOCAL),
        ("HMDB51", "What actions or objects interactions are the person in the video doing?", "", GLOBAL),
        ("UCF101", "What activities or sports are being performed by the person in the video?", "", GLOBAL),
        ("Breakfast", "Recognize the breakfast type that the person is cooking in the video.", "", GLOBAL),
    ],
    "qa": [(name, _VIDEO_QA, "", LOCAL) for name in ("MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA")],
    "retrieval": [
        ("DiDeMo", "Find a video that includes the following described scenes:", _VIDEO_TGT, GLOBAL),
        ("MSR-VTT", "Find a video that contains the following visual content:", _VIDEO_TGT, GLOBAL),
        ("MSVD", "Find the video snippet that corresponds to the given summary:", _VIDEO_TGT, GLOBAL),
        ("VATEX", "Select a video that fits the description provided:", _VIDEO_TGT, GLOBAL),
        ("YouCook2", "Find a video that demonstrates the following action while making a recipe:", _VIDEO_TGT,
         GLOBAL),
    ],
    "moment_retrieval": [
        ("QVHighlight", "Find the clip that corresponds to the described scene in the given video:", _VIDEO_TGT,
         LOCAL),
        ("Charades-STA", "Find the clip that corresponds to the described scene in the given video:", _VIDEO_TGT,
         LOCAL),
        ("MomentSeeker", "Find the clip that corresponds to the given text:",
         "Understand the content of the provided video clip.", LOCAL),
    ],
}

# Where each video task's annotations and frames are: (repository, config, split), parser, frame folder.
_VIDEO_SOURCES = {
    "K700": (("VLM2Vec/Kinetics-700", None, "test"), "video_classification", "video_cls/K700"),
    "SmthSmthV2": (("VLM2Vec/SmthSmthV2", None, "test"), "ssv2", "video_cls/SSv2"),
    "HMDB51": (("VLM2Vec/HMDB51", None, "test"), "video_classification", "video_cls/HMDB51"),
    "UCF101": (("VLM2Vec/UCF101", None, "test"), "video_classification", "video_cls/UCF101"),
    "Breakfast": (("VLM2Vec/Breakfast", None, "test"), "video_classification", "video_cls/Breakfast"),
    "MVBench": (("VLM2Vec/MVBench", None, "train"), "mvbench", "video_qa/MVBench"),
    "Video-MME": (("VLM2Vec/Video-MME", None, "test"), "videomme", "video_qa/Video-MME"),
    "NExTQA": (("VLM2Vec/NExTQA", "MC", "test"), "nextqa", "video_qa/NExTQA"),
    "EgoSchema": (("VLM2Vec/EgoSchema", "Subset", "test"), "egoschema", "video_qa/EgoSchema"),
    "ActivityNetQA": (("VLM2Vec/ActivityNetQA", None, "test"), "activitynetqa", "video_qa/ActivityNetQA"),
    "DiDeMo": (("VLM2Vec/DiDeMo", None, "test"), "didemo", "video_ret/DiDeMo"),
    "MSR-VTT": (("VLM2Vec/MSR-VTT", "test_1k", "test"), "msrvtt", "video_ret/MSR-VTT"),
    "MSVD": (("VLM2Vec/MSVD", None, "test"), "msvd", "video_ret/MSVD"),
    "VATEX": (("VLM2Vec/VATEX", None, "test"), "vatex", "video_ret/VATEX"),
    "YouCook2": (("lmms-lab/YouCook2", None, "val"), "youcook2", "video_ret/YouCook2"),
    "QVHighlight": (("VLM2Vec/QVHighlight", None, "test"), "moment_retrieval", "video_mret/QVHighlight"),
    "Charades-STA": (("VLM2Vec/Charades-STA", None, "test"), "moment_retrieval", "video_mret/Charades_STA"),
    "MomentSeeker": (("VLM2Vec/MomentSeeker", None, "test"), "momentseeker", "video_mret/MomentSeeker"),
}

# ---- visual documents (24) --------------------------------------------------------------------
_DOC_QRY = "Find a document image that matches the given query:"
_DOC_TGT = "Understand the content of the provided document image."
_VISDOC_TASKS = {
    "vidore_v1": [
        ("ViDoRe_arxivqa", ("vidore/arxivqa_test_subsampled_beir", None, "test")),
        ("ViDoRe_docvqa", ("vidore/docvqa_test_subsampled_beir", None, "test")),
        ("ViDoRe_infovqa", ("vidore/infovqa_test_subsampled_beir", None, "test")),
        ("ViDoRe_tabfquad", ("vidore/tabfquad_test_subsampled_beir", None, "test")),
        ("ViDoRe_tatdqa", ("vidore/tatdqa_test_beir", None, "test")),
        ("ViDoRe_shiftproject", ("vidore/shiftproject_test_beir", None, "test")),
        ("ViDoRe_syntheticDocQA_artificial_intelligence",
         ("vidore/syntheticDocQA_artificial_intelligence_test_beir", None, "test")),
        ("ViDoRe_syntheticDocQA_energy", ("vidore/syntheticDocQA_energy_test_beir", None, "test")),
        ("ViDoRe_syntheticDocQA_government_reports",
         ("vidore/syntheticDocQA_government_reports_test_beir", None, "test")),
        ("ViDoRe_syntheticDocQA_healthcare_industry",
         ("vidore/syntheticDocQA_healthcare_industry_test_beir", None, "test")),
    ],
    "vidore_v2": [
        ("ViDoRe_esg_reports_human_labeled_v2", ("vidore/esg_reports_human_labeled_v2", None, "test")),
        ("ViDoRe_biomedical_lectures_v2_multilingual", ("vidore/biomedical_lectures_v2", None, "test")),
        ("ViDoRe_economics_reports_v2_multilingual", ("vidore/economics_reports_v2", None, "test")),
        ("ViDoRe_esg_reports_v2_multilingual", ("vidore/esg_reports_v2", None, "test")),
    ],
    "visrag": [
        (f"VisRAG_{name}", (f"openbmb/VisRAG-Ret-Test-{name}", None, "train"))
        for name in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")
    ],
    "ood": [
        ("ViDoSeek-page", ("VLM2Vec/ViDoSeek-page-fixed", None, "test")),
        ("ViDoSeek-doc", ("VLM2Vec/ViDoSeek", None, "test")),
        ("MMLongBench-page", ("VLM2Vec/MMLongBench-page-fixed", None, "test")),
        ("MMLongBench-doc", ("VLM2Vec/MMLongBench-doc", None, "test")),
    ],
}


# Page-image folders of the visual-document tasks in a TIGER-Lab/MMEB-V2 download (where not the task name).
_VISDOC_FOLDERS = {"ViDoRe_esg_reports_human_labeled_v2": "esg_reports_human_labeled_v2",
                   "ViDoRe_biomedical_lectures_v2_multilingual": "biomedical_lectures_v2_multilingual",
                   "ViDoRe_economics_reports_v2_multilingual": "economics_reports_v2_multilingual",
                   "ViDoRe_esg_reports_v2_multilingual": "esg_reports_v2_multilingual"}


def _build_registry() -> dict[str, TaskInfo]:
    tasks: list[TaskInfo] = []
    for meta, rows in _IMAGE_TASKS.items():
        tasks += [TaskInfo(n, IMAGE, meta, HIT1, LOCAL, q, t, hub=(_IMAGE_HUB, n, "test"),
                           extra={"parser": "image", "media": "image-tasks"}) for n, q, t in rows]
    for meta, rows in _VIDEO_TASKS.items():
        for n, q, t, e in rows:
            hub, parser, frames = _VIDEO_SOURCES[n]
            tasks.append(TaskInfo(n, VIDEO, meta, HIT1, e, q, t, hub=hub,
                                  extra={"parser": parser, "media": f"video-tasks/frames/{frames}"}))
    for meta, rows in _VISDOC_TASKS.items():
        tasks += [TaskInfo(n, VISDOC, meta, NDCG5, GLOBAL, _DOC_QRY, _DOC_TGT, hub=h,
                           extra={"parser": "visrag" if meta == "visrag" else "vidore",
                                  "media": f"visdoc-tasks/{_VISDOC_FOLDERS.get(n, n)}"}) for n, h in rows]
    return {t.name: t for t in tasks}


MMEB_V2: dict[str, TaskInfo] = _build_registry()


def _build_v3_registry() -> dict[str, TaskInfo]:
    tasks = {name: replace(t, benchmark="mmeb-v3") for name, t in MMEB_V2.items()}
    for spec in read_json(Path(__file__).with_name("mmeb_v3_tasks.json")):
        tasks[spec["name"]] = TaskInfo(
            spec["name"], spec["modality"], spec["meta_task"], spec["metric"], spec["eval_type"],
            spec.get("qry_inst", ""), "", benchmark="mmeb-v3", extra={"parser": spec["parser"], "files": spec["files"]})
    return tasks


MMEB_V3: dict[str, TaskInfo] = _build_v3_registry()
BENCHMARKS = {"mmeb-v2": MMEB_V2, "mmeb-v3": MMEB_V3}


# ---- MiniMMEB -----------------------------------------------------------------------------------
class TaskSelectionError(ValueError):
    """A ``--tasks`` / ``--benchmark`` request that cannot be resolved; the message says why."""


def minimmeb_tasks(data: str | Path) -> dict[str, TaskInfo]:
    """The tasks of a MiniMMEB folder, read from its ``manifest.json``."""
    manifest = Path(data) / "manifest.json"
    if not manifest.is_file():
        raise TaskSelectionError(f"{data} is not a MiniMMEB folder (no manifest.json); "
                                 f"build one with `mmemb minimmeb build --out DIR` and pass --data DIR")
    spec = read_json(manifest)
    out = {}
    for name, t in spec.get("tasks", {}).items():
        out[name] = TaskInfo(
            name=name, modality=t.get("modality", IMAGE), meta_task=t["meta_task"], metric=t.get("metric", HIT1),
            eval_type=t.get("eval_type", LOCAL), qry_inst=t.get("qry_inst", ""), tgt_inst=t.get("tgt_inst", ""),
            benchmark="minimmeb", kind=t.get("kind"), extra={"counts": t.get("counts", {})},
        )
    return out


def benchmark_tasks(benchmark: str, data: str | Path | None = None) -> dict[str, TaskInfo]:
    if benchmark in BENCHMARKS:
        return dict(BENCHMARKS[benchmark])
    if benchmark == "minimmeb":
        if data is None:
            raise TaskSelectionError("the minimmeb benchmark needs --data DIR (a folder made by `mmemb minimmeb build`)")
        return minimmeb_tasks(data)
    raise TaskSelectionError(f"unknown benchmark {benchmark!r}; choose mmeb-v2, mmeb-v3 or minimmeb")


def task_groups(tasks: dict[str, TaskInfo]) -> dict[str, list[str]]:
    """Group name -> task names: the whole benchmark, each modality, each meta-task."""
    groups: dict[str, list[str]] = {}
    for t in tasks.values():
        for g in (t.benchmark, f"{t.benchmark}-{t.modality}", t.group, f"{t.benchmark}-{t.group}"):
            groups.setdefault(g, []).append(t.name)
        if t.kind:
            groups.setdefault(f"{t.benchmark}-{t.kind}", []).append(t.name)
    return groups


def resolve_tasks(spec: str | list[str], data: str | Path | None = None) -> list[TaskInfo]:
    """Tasks named by a ``--tasks`` value: comma-separated task names, group names and/or globs
    over task names (``*``, ``?``, ``[...]``, case-insensitive: ``"Mini*"``, ``"*QA"``).

    Groups: ``mmeb-v2``, ``mmeb-v2-image|video|visdoc``, ``mmeb-v3``, ``mmeb-v3-text|tool|gui|memory|audio|...``,
    meta-task groups such as ``image-classification``, ``visdoc-vidore_v2`` or ``text-BRIGHT``,
    ``minimmeb`` (and ``minimmeb-easy``, ``minimmeb-compositional``). MiniMMEB names need ``data``
    (its folder). A task in both MMEB versions is the MMEB-V2 one, except within ``mmeb-v3`` groups.
    """
    tokens = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not tokens:
        raise TaskSelectionError("no tasks given")
    pool = {**MMEB_V3, **MMEB_V2}
    mini: dict[str, TaskInfo] = {}
    if data is not None and (Path(data) / "manifest.json").is_file():
        mini = minimmeb_tasks(data)
    elif any(tok.startswith("minimmeb") for tok in tokens):
        benchmark_tasks("minimmeb", data)  # raises with the reason
    pool.update(mini)  # a MiniMMEB task of the same name as an MMEB one is not expected; MiniMMEB wins
    groups = {**task_groups(MMEB_V3), **task_groups(MMEB_V2)}
    for g, names in task_groups(mini).items():
        groups[g] = names
    out: list[TaskInfo] = []
    for tok in tokens:
        if tok in groups:
            names = groups[tok]
        elif tok in pool:
            names = [tok]
        elif any(c in tok for c in "*?["):
            names = [n for n in pool if fnmatch.fnmatchcase(n.lower(), tok.lower())]
            if not names:
                raise TaskSelectionError(f"no task matches {tok!r}; `mmemb tasks` lists them")
        else:
            raise TaskSelectionError(f"unknown task or group {tok!r}; `mmemb tasks` lists them "
                                     f"(groups: {', '.join(sorted(groups))})")
        source = MMEB_V3 if tok.startswith("mmeb-v3") else pool
        out += [source[n] for n in names if source[n] not in out]
    return out
