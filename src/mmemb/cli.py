"""The ``mmemb`` command: one verb per job. Heavy imports happen inside each verb."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import typer

from .defaults import (
    BATCH_SIZE,
    CORPUS_MODE,
    DEFAULT_MODE,
    DEFAULT_ON_ERROR,
    MAX_IMAGE_PIXELS,
    MAX_REASONING_TOKENS,
    THINK_THRESHOLD,
)
from .serve.settings import ServeSettings

IMAGE_PIXELS_HELP = "Largest image, width x height (the item fails beyond)."

app = typer.Typer(
    help="mmemb: multimodal embeddings from a multimodal LLM that reasons only when reasoning helps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("init-backbone")
def init_backbone(
    out: Path = typer.Option(..., "--out", help="Folder to write the checkpoint to."),
    arch: str = typer.Option("qwen3_vl", help="qwen2_vl | qwen2_5_vl | qwen3_vl"),
    size: str = typer.Option("tiny", help="tiny (~0.7M params) | small | 4b (Qwen3-VL-4B shape, random weights)"),
    corpus: Optional[Path] = typer.Option(None, help="Text file (one line per sample) to train the tokenizer on; "
                                                     "default: MiniMMEB's vocabulary."),
    vocab_size: int = typer.Option(640, help="Target BPE vocabulary size."),
    seed: int = typer.Option(0),
):
    """Build a randomly initialised backbone of a real Qwen-VL class, offline, loadable with Auto* classes."""
    from .data.minimmeb import tokenizer_corpus
    from .model.tiny import build_tiny_backbone

    lines = corpus.read_text(encoding="utf-8").splitlines() if corpus else tokenizer_corpus()
    path = build_tiny_backbone(arch, out, size=size, corpus=lines, vocab_size=vocab_size, seed=seed)
    typer.echo(f"wrote {arch} ({size}) backbone to {path}")


_NUM_PROCESSES_HELP = ("Run on N processes: re-launched through `accelerate launch` (CPU: gloo, one thread each; "
                       "with --device cuda, one GPU each). Under your own accelerate launch / torchrun, leave it out.")


ENGINE_HELP = ("What writes rationales: hf (the model itself) | vllm (a vLLM engine over the same checkpoint; "
               "pip install 'mmemb[vllm]' and a CUDA GPU; the embedding still comes from the model).")


@app.command()
def encode(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Checkpoint folder (or hub name when the hub is reachable)."),
    input: Path = typer.Option(..., "--input", help="JSONL: one item per line, e.g. "
                                                    '{"id": "q1", "text": "...", "image": "img.png", "instruction": "..."}'),
    output: Path = typer.Option(..., help="Output prefix: writes OUTPUT.npy (vectors) and OUTPUT.jsonl (per item)."),
    mode: str = typer.Option(DEFAULT_MODE, help="direct | reason | auto"),
    batch_size: int = typer.Option(BATCH_SIZE),
    think_threshold: float = typer.Option(THINK_THRESHOLD, help="auto mode: reason when p(<think>) >= this."),
    max_reasoning_tokens: int = typer.Option(MAX_REASONING_TOKENS),
    max_reasoning_steps: Optional[int] = typer.Option(None, help="Stop reasoning after this many sentences."),
    on_error: str = typer.Option(DEFAULT_ON_ERROR, help="skip: report bad items and lines, go on | raise: stop at "
                                                        "the first."),
    chunk_size: int = typer.Option(2048, help="Save finished work every this many items (and at least every "
                                              "--save-every seconds): a rerun after a kill continues from there. "
                                              "Also the unit of work shared between processes."),
    save_every: float = typer.Option(30.0, help="Seconds between saves of finished work, at most (see --chunk-size)."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, help=IMAGE_PIXELS_HELP),
    engine: str = typer.Option("hf", help=ENGINE_HELP),
    num_processes: int = typer.Option(1, "--num-processes", help=_NUM_PROCESSES_HELP),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Encode items from a JSONL file (resumable: rerun after a kill to continue)."""
    from .jobs.encode import run_encode

    device = _processes_for(ctx, num_processes, device)
    start = time.perf_counter()
    embedder = _load_embedder(model, device=device, dtype=dtype, max_image_pixels=max_image_pixels, engine=engine)
    with _user_errors():
        s = run_encode(embedder, input, output, chunk_size=chunk_size, save_every_s=save_every, mode=mode,
                       batch_size=batch_size, think_threshold=think_threshold,
                       max_reasoning_tokens=max_reasoning_tokens, max_reasoning_steps=max_reasoning_steps,
                       on_error=on_error, show_progress=True)
    if _is_main():
        for row in s["failed_rows"][:20]:
            typer.echo(f"  failed {row['id']}: {row['error']}", err=True)
        typer.echo(f"{s['items']} items, {s['failed']} failed, {s['reasoned_share']:.1%} reasoned, "
                   f"{s['prompt_tokens']} prompt + {s['generated_tokens']} generated tokens, "
                   f"{time.perf_counter() - start:.1f}s")


@app.command("export-st")
def export_st(
    model: str = typer.Option(..., help="Checkpoint folder (a LoRA adapter is merged into its base)."),
    out: Path = typer.Option(..., "--out", help="Folder to write: load it with SentenceTransformer(OUT)."),
    dtype: str = typer.Option("auto", help="Weights' dtype in the export (auto: float32 on CPU)."),
):
    """Export a checkpoint as a sentence-transformers model (direct-mode embeddings: sentence-transformers
    cannot reason first). Needs `pip install mmemb[st]`."""
    from .model.st_export import export_sentence_transformers

    typer.echo(f"wrote {export_sentence_transformers(model, out, dtype=dtype)}: SentenceTransformer({str(out)!r})")


@app.command("train")
def train_cmd(
    config: Path = typer.Option(..., "--config", help="YAML recipe (see configs/ and docs/training.md)."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="key=value overrides of the recipe, e.g. lr=3e-4 loss.temperature=0.05 lora.enabled=true "
                   "datasets.0.weight=2 (values are YAML)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output_dir."),
    num_processes: int = typer.Option(1, "--num-processes", help="Re-launch through `accelerate launch` on N "
                                                                 "processes (DDP; gloo on CPU)."),
    accelerate_config: Optional[Path] = typer.Option(
        None, "--accelerate-config", help="An accelerate config file (FSDP, DeepSpeed; see configs/accelerate/) "
                                          "for the re-launch."),
):
    """Contrastive / joint training of a backbone from a recipe (resumable; runs under accelerate)."""
    import os
    import subprocess
    import sys

    from .parallel import launch_command, launched
    from .train.config import ConfigError, load_config
    from .train.trainer import RunExists, TrainingDiverged, check_output_dir, train

    try:
        if (num_processes > 1 or accelerate_config) and not launched():
            check_output_dir(load_config(config, overrides or []), resume)  # fail here, not in N processes
            args = [f"--config={config}", *(["--resume"] if resume else []), *(overrides or [])]
            cmd = launch_command(["train", *args], num_processes, str(accelerate_config) if accelerate_config else None)
            raise typer.Exit(subprocess.call(cmd))
        final = train(config, overrides or [], resume=resume)
    except (ConfigError, RunExists, TrainingDiverged, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"final model: {final}")


_SERVE = ServeSettings()  # the server's defaults, shown in `mmemb serve --help`

@app.command()
def serve(
    model: str = typer.Option(..., help="Checkpoint folder to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000),
    served_model_name: list[str] = typer.Option(
        [], help="Name in /v1/models and in requests' \"model\" (default: the checkpoint folder's name); repeat it "
                 "for more accepted names. The --model value as given is accepted too."),
    max_batch_size: int = typer.Option(_SERVE.max_batch_size,
                                       help="Items per model batch; concurrent requests are merged."),
    max_batch_tokens: int = typer.Option(_SERVE.max_batch_tokens,
                                         help="Tokens per model batch, counted with padding (items x the longest); "
                                              "a longer item runs alone."),
    max_wait_ms: float = typer.Option(_SERVE.max_wait_ms,
                                      help="Longest a request waits for others to share its batch."),
    max_queued_items: int = typer.Option(_SERVE.max_queued_items,
                                         help="Items waiting at most; beyond, requests get 503."),
    max_body_bytes: int = typer.Option(_SERVE.max_body_bytes, help="Largest request body (413 beyond)."),
    max_items: int = typer.Option(_SERVE.max_items, help="Most items in one request (400 beyond)."),
    max_input_tokens: Optional[int] = typer.Option(None, help="Most tokens of one input, images included (400 "
                                                               "beyond, before any model work). Default: the "
                                                               "model's context length."),
    max_image_pixels: int = typer.Option(_SERVE.max_image_pixels, help="Largest image, width x height (400 beyond)."),
    request_timeout: float = typer.Option(_SERVE.request_timeout_s, help="Seconds a request may take (504 beyond; "
                                                                         "its queued work is dropped)."),
    allow_local_root: Optional[Path] = typer.Option(None, help="Allow image paths, only inside this folder "
                                                               "(symlinks and .. resolved). Off by default."),
    allow_urls: bool = typer.Option(False, help="Allow http(s) image URLs to public addresses (fetched by the "
                                                "server). Off by default."),
    allow_private_urls: bool = typer.Option(False, help="With --allow-urls: also loopback, private and link-local "
                                                        "addresses (trusted networks only)."),
    api_key: Optional[str] = typer.Option(None, envvar="MMEMB_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    think_threshold: float = typer.Option(_SERVE.think_threshold,
                                          help="reasoning=auto: reason when p(<think>) >= this."),
    max_reasoning_tokens: int = typer.Option(_SERVE.max_reasoning_tokens),
    engine: str = typer.Option("hf", help=ENGINE_HELP),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
    log_level: str = typer.Option("info"),
):
    """Serve an OpenAI-compatible embedding API (POST /v1/embeddings, GET /v1/models, GET /health)."""
    from .serve import create_app, run_server

    names = served_model_names(model, served_model_name)
    settings = ServeSettings(
        model_name=names[0], aliases=names[1:], max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms, max_queued_items=max_queued_items, max_body_bytes=max_body_bytes,
        max_items=max_items, max_input_tokens=max_input_tokens, max_image_pixels=max_image_pixels,
        request_timeout_s=request_timeout, allow_local_root=None if allow_local_root is None else str(allow_local_root),
        allow_urls=allow_urls, allow_private_urls=allow_private_urls, api_key=api_key or None,
        think_threshold=think_threshold, max_reasoning_tokens=max_reasoning_tokens)
    embedder = _load_embedder(model, device=device, dtype=dtype, max_image_pixels=max_image_pixels, engine=engine)
    run_server(create_app(embedder, settings), host=host, port=port, log_level=log_level)


def served_model_names(model: str, given: list[str]) -> list[str]:
    """The served name first (given, or the checkpoint folder's name), then the other accepted names:
    further given names, and the --model value as typed and as an absolute path."""
    names = list(given) or [Path(model).name]
    return list(dict.fromkeys([*names, model, _model_ref(model)]))


index_app = typer.Typer(help="Build and extend FAISS indexes of encoded items (then use `mmemb search`).",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Checkpoint folder to encode with (recorded in the index)."),
    input: Path = typer.Option(..., "--input", help="JSONL corpus: one item per line, e.g. "
                                                    '{"id": "d1", "text": "...", "image": "img.png"}'),
    out: Path = typer.Option(..., help="Index folder to write (replaced atomically)."),
    mode: str = typer.Option(CORPUS_MODE, help="How to encode the corpus: direct | reason | auto."),
    kind: str = typer.Option("flat", help="flat (exact) | ivf | hnsw (approximate) | ivfpq (compressed codes, for "
                                          "corpora whose float32 vectors do not fit in memory)."),
    nlist: Optional[int] = typer.Option(None, help="ivf, ivfpq: number of lists (default ~sqrt(n), trained on the "
                                                   "corpus)."),
    nprobe: int = typer.Option(8, help="ivf, ivfpq: lists searched per query."),
    pq_m: Optional[int] = typer.Option(None, help="ivfpq: bytes per vector (divides the dimension; default dim/8)."),
    hnsw_m: int = typer.Option(32, help="hnsw: links per node."),
    ef_search: int = typer.Option(64, help="hnsw: candidates explored per query."),
    batch_size: int = typer.Option(BATCH_SIZE),
    think_threshold: float = typer.Option(THINK_THRESHOLD, help="auto mode: reason when p(<think>) >= this."),
    max_reasoning_tokens: int = typer.Option(MAX_REASONING_TOKENS),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, help=IMAGE_PIXELS_HELP),
    chunk_size: int = typer.Option(2048, help="Items per saved chunk of vectors: the unit of resuming and of "
                                              "sharing work between processes."),
    num_processes: int = typer.Option(1, "--num-processes", help=_NUM_PROCESSES_HELP),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Encode a JSONL corpus into a new index (resumable: rerun after a kill to continue)."""
    from .index.store import IndexConfig
    from .jobs.index import build_index
    from .model.embedder import Embedder

    device = _processes_for(ctx, num_processes, device)
    embedder = Embedder.from_pretrained(model, device=device, dtype=dtype, max_image_pixels=max_image_pixels)
    with _user_errors():
        config = IndexConfig(model=_model_ref(model), dim=embedder.dim, kind=kind, mode=mode,
                             think_threshold=think_threshold, max_reasoning_tokens=max_reasoning_tokens,
                             nlist=nlist, nprobe=nprobe, pq_m=pq_m, hnsw_m=hnsw_m, ef_search=ef_search)
        report = build_index(embedder, input, out, config, batch_size=batch_size, show_progress=True,
                             chunk_size=chunk_size)
    if _is_main():
        _echo_report(report, out)


@index_app.command("add")
def index_add(
    index: Path = typer.Option(..., help="Index folder (from `mmemb index build`)."),
    input: Path = typer.Option(..., "--input", help="JSONL of new items; their ids must be new."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder (default: the one the index records)."),
    batch_size: int = typer.Option(BATCH_SIZE),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Add items to an existing index; earlier items keep their ids, duplicate ids are refused."""
    from .index.store import VectorIndex
    from .jobs.index import add_to_index
    from .model.embedder import Embedder

    with _user_errors():
        recorded = VectorIndex.load(index).config.model
        if model is not None and _model_ref(model) != recorded:
            typer.echo(f"warning: the index was built with {recorded}; adding vectors of {model}", err=True)
        embedder = Embedder.from_pretrained(model or recorded, device=device, dtype=dtype)
        report = add_to_index(embedder, input, index, batch_size=batch_size, show_progress=True)
    _echo_report(report, index)


@app.command()
def search(
    index: Path = typer.Option(..., help="Index folder (from `mmemb index build`)."),
    query: Optional[str] = typer.Option(None, help="Query text."),
    image: Optional[Path] = typer.Option(None, help="Query image."),
    instruction: Optional[str] = typer.Option(None, help="Task instruction for the query."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder (default: the one the index records)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of results."),
    reasoning: str = typer.Option("auto", help="auto (the model decides) | always | never."),
    nprobe: Optional[int] = typer.Option(None, help="ivf, ivfpq: lists searched (default: as built)."),
    ef_search: Optional[int] = typer.Option(None, help="hnsw: candidates explored (default: as built)."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Print the best matches of a query (rank, score, id, text) and the query's rationale if it reasoned."""
    from .index.store import VectorIndex
    from .items import Item
    from .jobs.index import search as run_search
    from .model.embedder import REASONING_MODES, Embedder

    if query is None and image is None:
        raise typer.BadParameter("give --query, --image or both")
    if reasoning not in REASONING_MODES:
        raise typer.BadParameter(f"--reasoning must be one of {list(REASONING_MODES)}")
    with _user_errors():
        idx = VectorIndex.load(index)
        idx.config.nprobe = nprobe or idx.config.nprobe
        idx.config.ef_search = ef_search or idx.config.ef_search
        embedder = Embedder.from_pretrained(model or idx.config.model, device=device, dtype=dtype)
        item = Item(text=query, images=[str(image)] if image else [], instruction=instruction)
        hits, enc = run_search(idx, embedder, [item], k=k, mode=REASONING_MODES[reasoning])
    if enc.reasoned[0]:
        typer.echo(f"query rationale: {enc.rationales[0]}")
    typer.echo(f"{'rank':>4}  {'score':>7}  id\ttext")
    for hit in hits[0]:
        text = hit.row.get("text") or " ".join(hit.row.get("images", []))
        typer.echo(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.id}\t{text[:100]}")


def _processes_for(ctx: typer.Context, num_processes: int, device: str) -> str:
    """``--num-processes N``: run this same command on N processes (then exit with their status).
    Returns the device of this process (``cuda``: its own GPU when launched)."""
    from .parallel import command_line, launch_command, launched, process_device

    if num_processes > 1 and not launched():
        import subprocess

        raise typer.Exit(subprocess.call(launch_command(command_line(ctx), num_processes)))
    return process_device(device)


def _is_main() -> bool:
    """Whether this is the process that reports (the only one, or rank 0 of the launched ones)."""
    from .parallel import processes

    return processes().is_main


def _model_ref(model: str) -> str:
    """A model folder as an absolute path (usable from anywhere); other names as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _echo_report(report, path: Path) -> None:
    typer.echo(f"added {report.added} items to {path} ({report.total} in all), "
               f"{len(report.failed)} failed, {report.seconds:.1f}s")
    for item_id, reason in report.failed[:20]:
        typer.echo(f"  failed {item_id}: {reason}", err=True)


def _load_embedder(model: str, engine: str, **opts):
    """Embedder.from_pretrained; an unusable --engine (vLLM or GPU missing) ends the command with its reason."""
    from .model.embedder import Embedder
    from .model.vllm_engine import EngineUnavailable, check_engine

    try:
        check_engine(engine)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--engine") from None
    try:
        return Embedder.from_pretrained(model, engine=engine, **opts)
    except EngineUnavailable as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _user_errors():
    """Bad input (missing files, duplicate ids, bad rows) ends the command with its message, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


minimmeb_app = typer.Typer(help="MiniMMEB, the embedded benchmark (scikit-learn's scanned digits, MMEB format).",
                           no_args_is_help=True)
app.add_typer(minimmeb_app, name="minimmeb")


@minimmeb_app.command("build")
def minimmeb_build(
    out: Path = typer.Option(..., "--out", help="Folder to write the benchmark to (replaced atomically)."),
    seed: int = typer.Option(0, help="Seeds the scan split and every sample."),
    train_pairs: int = typer.Option(20_000, help="Training pairs across all tasks."),
    test_queries: int = typer.Option(200, help="Test queries per task."),
    val_queries: int = typer.Option(100, help="Validation queries per task."),
):
    """Build MiniMMEB: train pairs, val/test tasks in MMEB-V2's image-task format, a manifest."""
    from .data.minimmeb import BuildConfig, build, manifest

    start = time.perf_counter()
    build(out, BuildConfig(seed=seed, train_pairs=train_pairs, test_queries=test_queries,
                           val_queries=val_queries), progress=True)
    m = manifest(out)
    typer.echo(f"MiniMMEB ({len(m['tasks'])} tasks, scans {m['scans']}) written to {out} "
               f"in {time.perf_counter() - start:.1f}s")


@app.command()
def tasks(
    benchmark: str = typer.Option("mmeb-v2", help="mmeb-v2 (78 tasks) | mmeb-v3 (190) | minimmeb (needs --data)."),
    data: Optional[Path] = typer.Option(None, help="MiniMMEB folder (its manifest.json lists the tasks)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per task instead of a table."),
):
    """List benchmark tasks: name, modality, meta-task, main metric, eval type (local / global ranking)."""
    import json

    from .data.mmeb import TaskSelectionError, benchmark_tasks

    try:
        registry = benchmark_tasks(benchmark, data)
    except TaskSelectionError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        typer.echo(json.dumps([t.to_json() for t in registry.values()], indent=2))
        return
    width = max(len(n) for n in registry) if registry else 4
    typer.echo(f"{'task':<{width}}  modality  meta-task         metric  eval    kind")
    for t in registry.values():
        typer.echo(f"{t.name:<{width}}  {t.modality:<8}  {t.meta_task:<16}  {t.metric:<6}  {t.eval_type:<6}  "
                   f"{t.kind or ''}")
    typer.echo(f"{len(registry)} tasks; groups for --tasks: {benchmark}, {benchmark}-<modality>, "
               f"<modality>-<meta-task> (e.g. image-classification)")


@app.command("eval")
def eval_(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Checkpoint folder (or hub name when the hub is reachable)."),
    tasks: str = typer.Option(..., help="Comma-separated task names, groups (minimmeb, mmeb-v2, "
                                        "mmeb-v2-image|video|visdoc, image-classification, ...: see `mmemb tasks`) "
                                        "and/or globs over task names ('Mini*', '*QA')."),
    out: Path = typer.Option(..., "--out", help="Run folder: RUN/<TASK>/{predictions.jsonl,score.json}, "
                                                "RUN/summary.{json,md}. Rerun the same command to resume."),
    mode: str = typer.Option(DEFAULT_MODE, help="Queries: direct | reason | auto (reason where the model chooses to)."),
    data: Optional[Path] = typer.Option(None, help="MiniMMEB folder, or a local MMEB-V2 copy "
                                                   "(image-tasks/, video-tasks/, visdoc-tasks/; see docs/eval.md)."),
    candidate_mode: str = typer.Option(CORPUS_MODE, help="Candidates: direct | reason | auto."),
    think_threshold: float = typer.Option(THINK_THRESHOLD, help="auto mode: reason when p(<think>) >= this."),
    max_reasoning_tokens: int = typer.Option(MAX_REASONING_TOKENS,
                                             help="Reasoning budget per item; </think> is forced after it."),
    max_reasoning_steps: Optional[int] = typer.Option(None, help="Stop reasoning after this many sentences."),
    batch_size: int = typer.Option(BATCH_SIZE, help="Encode batch size; finished work is saved every 4 batches."),
    limit: Optional[int] = typer.Option(None, help="Only the first N queries of each task (a quick look; the "
                                                   "candidates they rank are encoded, not the whole task's)."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, help=IMAGE_PIXELS_HELP),
    split: str = typer.Option("test", help="MiniMMEB split to evaluate (test | val)."),
    cache: Optional[Path] = typer.Option(None, help="Candidate-embedding cache folder "
                                                    "(default ~/.cache/mmemb/eval, or $MMEMB_CACHE/eval)."),
    protocol: str = typer.Option("auto", help="Embedding convention: mmemb | vlm2vec | qwen3-vl-embedding | ume-r1 "
                                              "(auto: read from the model folder; see docs/eval.md)."),
    engine: str = typer.Option("hf", help=ENGINE_HELP),
    num_processes: int = typer.Option(1, "--num-processes", help=_NUM_PROCESSES_HELP),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Evaluate a model on benchmark tasks (MiniMMEB or MMEB-V2): Hit@1 / NDCG@5 and friends, resumable."""
    from .data.loaders import DataNotFound
    from .data.mmeb import TaskSelectionError, resolve_tasks
    from .eval.runner import EvalError, evaluate
    from .model.protocols import PROTOCOLS

    try:
        selected = resolve_tasks(tasks, data)
    except TaskSelectionError as e:
        raise typer.BadParameter(str(e), param_hint="--tasks") from None
    device = _processes_for(ctx, num_processes, device)
    start = time.perf_counter()
    if protocol not in ("auto", *PROTOCOLS):
        raise typer.BadParameter(f"choose auto or one of {', '.join(PROTOCOLS)}", param_hint="--protocol")
    embedder = _load_embedder(model, device=device, dtype=dtype, protocol=protocol,
                              max_image_pixels=max_image_pixels, engine=engine)
    for side, value in (("--mode", mode), ("--candidate-mode", candidate_mode)):
        try:
            embedder.protocol.resolve_mode(value)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=side) from None
    try:
        summary = evaluate(embedder, selected, out, mode=mode, data=None if data is None else str(data),
                           candidate_mode=candidate_mode, think_threshold=think_threshold,
                           max_reasoning_tokens=max_reasoning_tokens, max_reasoning_steps=max_reasoning_steps,
                           batch_size=batch_size, limit=limit, split=split,
                           cache_dir=None if cache is None else str(cache))
    except (DataNotFound, EvalError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if _is_main():
        typer.echo((out / "summary.md").read_text(encoding="utf-8"))
        typer.echo(f"wrote {out}/summary.md ({time.perf_counter() - start:.1f}s)")
        for reason in summary["missing_tasks"].values():
            typer.echo(f"not evaluated: {reason}", err=True)
    if summary["missing_tasks"]:
        raise typer.Exit(2)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders written by `mmemb eval`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for report.md and the PNG charts "
                                                           "(default: the first run folder)."),
):
    """Compare runs: a markdown table and PNG bar charts per task and per meta-task."""
    from .eval.report import write_report

    paths = write_report(runs, out or runs[0])
    typer.echo(paths["markdown"].read_text(encoding="utf-8"))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("convert-mmeb-train")
def convert_mmeb_train(
    input: Path = typer.Option(..., "--input", help="MMEB-train folder: one <dataset>/<split>-*.parquet folder each."),
    images: Path = typer.Option(..., help="Where MMEB-train's images are unpacked (row image paths are relative to it)."),
    out: Path = typer.Option(..., help="Output folder: <dataset>.jsonl Pair files for `mmemb train` / the pipeline."),
    split: str = typer.Option("original", help="original | diverse_instruction"),
    dataset: list[str] = typer.Option([], help="Only these datasets (repeatable)."),
):
    """Convert VLM2Vec's MMEB-train to mmemb's Pair JSONL (instructions split off as evaluation does)."""
    from .data.mmeb_train import convert_mmeb_train as convert

    counts = convert(input, images, out, datasets=dataset or None, split=split)
    typer.echo(f"{sum(counts.values())} pairs in {len(counts)} datasets written to {out}")


@app.command()
def rationales(
    teacher: list[str] = typer.Option(..., help="Teacher spec, repeatable: minimmeb[:faithful=0.4,...] | "
                                                "local:PATH | openai:BASE_URL#MODEL[?concurrency=8] | vllm:PATH"),
    data: str = typer.Option(..., help="Training pairs: a Pair-JSONL file, a glob, or a benchmark folder."),
    k: int = typer.Option(4, help="Candidate rationales per query and teacher."),
    out: Path = typer.Option(..., help="rationales.jsonl (appended; rows already there are skipped)."),
    tokenizer: Optional[str] = typer.Option(None, help="Count tokens with this model's tokenizer (the student's)."),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
):
    """K candidate rationales per training query from one or more teachers (resumable)."""
    from .data.pairs import read_pairs
    from .method.rationales import run_rationales
    from .method.teachers import make_teacher
    from .model.backbone import load_tokenizer

    tok = load_tokenizer(tokenizer) if tokenizer else None
    stats = run_rationales(read_pairs(data), [make_teacher(t, seed=seed) for t in teacher], k, out, tokenizer=tok,
                           batch_size=batch_size)
    typer.echo(f"{stats['written']} rationales written, {stats['skipped']} already there: {out}")


@app.command()
def select(
    model: str = typer.Option(..., help="The warm-up checkpoint that scores the rationales."),
    pairs: str = typer.Option(..., help="Training pairs: a Pair-JSONL file, a glob, or a benchmark folder."),
    rationales: Path = typer.Option(..., help="rationales.jsonl from `mmemb rationales`."),
    out: Path = typer.Option(..., help="selection.jsonl (appended; pairs already there are skipped); "
                                       "selection.md and selection.png are written beside it."),
    margin: float = typer.Option(0.5, help="Keep a rationale where its utility exceeds this."),
    utility: str = typer.Option("logprob", help="logprob: delta = s(r) - s(none) in nats; prob: the gain in the "
                                                "positive's probability, p(t+ | q, r) - p(t+ | q)."),
    temperature: float = typer.Option(0.05, help="The contrastive temperature the model was trained with."),
    sampled_negatives: int = typer.Option(16, help="Other pairs' positives added to each candidate set."),
    no_prompt_reuse: bool = typer.Option(False, help="Prefill every (query, rationale) separately (to measure reuse)."),
    seed: int = typer.Option(0),
):
    """Counterfactual pair-aware selection: label each pair reason (with its best rationale) or direct."""
    from .data.pairs import read_pairs
    from .method.rationales import load_rationales
    from .method.selection import SelectionConfig
    from .method.selection import select as run_select
    from .method.selection_report import write_selection_report
    from .model.embedder import Embedder

    cfg = SelectionConfig(margin=margin, utility=utility, temperature=temperature, sampled_negatives=sampled_negatives,
                          reuse_prompt=not no_prompt_reuse, seed=seed)
    stats = run_select(Embedder.from_pretrained(model), read_pairs(pairs), load_rationales(rationales), out, cfg)
    write_selection_report(out, out.with_suffix(""))
    typer.echo(f"{stats['pairs']} pairs scored in {stats['seconds']:.1f}s ({stats['skipped']} already there): {out}; "
               f"report {out.with_suffix('.md')}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def rl(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="YAML of RLConfig keys (or a pipeline config's `rl` section); "
                                                     "extra key=value arguments override it."),
    no_resume: bool = typer.Option(False, help="Start over instead of resuming from OUT/last."),
):
    """GRPO on the think / no-think decision, from the joint checkpoint (model=..., out=..., data=[...])."""
    from .method.grpo import load_rl_config, run_rl

    cfg = load_rl_config(config, ctx.args)
    if not cfg.model or not cfg.data:
        raise typer.BadParameter("give model=CHECKPOINT and data=[PAIRS] (in the config or as key=value)")
    typer.echo(f"final policy: {run_rl(cfg, resume=not no_resume)}")


@app.command()
def gate(
    model: str = typer.Option(..., help="The backbone whose layer-0 inputs the gate reads."),
    selection: Path = typer.Option(..., help="selection.jsonl: the reason / direct labels."),
    pairs: str = typer.Option(..., help="The training pairs the selection scored."),
    out: Path = typer.Option(..., help="Gate folder (load with Embedder.from_pretrained(model, gate=OUT))."),
    epochs: int = typer.Option(6),
    seed: int = typer.Option(0),
):
    """Train the plug-in reasoning gate on the counterfactual labels; prints held-out accuracy."""
    import json

    from .data.pairs import read_pairs
    from .method.gate_training import GateTrainConfig, train_gate
    from .method.selection import labelled_pairs
    from .model.backbone import load_backbone

    trained, metrics = train_gate(load_backbone(model), labelled_pairs(read_pairs(pairs), selection),
                                  GateTrainConfig(epochs=epochs, seed=seed), show_progress=True)
    trained.save(out)
    typer.echo(json.dumps(metrics))


@app.command("demo-table")
def demo_table(runs: list[Path] = typer.Argument(..., help="Demo run folders (one per seed), each with report.json.")):
    """The demo's results table over several runs: mean ± std per column (e.g. three seeds)."""
    from .fileio import read_json
    from .pipeline.report import seeds_table

    typer.echo(seeds_table([read_json(r / "report.json") for r in runs]))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def pipeline(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="Pipeline YAML (e.g. configs/minimmeb.yaml); defaults to the "
                                                     "MiniMMEB recipe. Extra key=value arguments override it."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage (e.g. joint). Stages in order: data, backbone, "
                                                   "pretrain_lm, pretrain, rationales, warmup, select, joint, blind, "
                                                   "rl, gate, baseline, eval, report."),
    only: Optional[str] = typer.Option(None, help="Run just this stage (its inputs must exist)."),
    force: list[str] = typer.Option([], help="Redo this stage and every stage that depends on it (repeatable)."),
    out: Optional[str] = typer.Option(None, help="Run folder (overrides the config's out)."),
):
    """Run the method's stages (data, backbone, pretrain, rationales, warm-up, select, joint, RL, gate,
    baseline, eval, report), each skipped when its outputs exist."""
    from .pipeline import load_pipeline_config, run_pipeline
    from .pipeline.run import ORDER

    for stage in [until, only, *force]:
        if stage is not None and stage not in ORDER:
            raise typer.BadParameter(f"unknown stage {stage!r}; stages: {', '.join(ORDER)}")
    cfg = load_pipeline_config(config, ctx.args, out=out)
    run_pipeline(cfg, until=until, only=only, forced=force)


@app.command()
def demo(
    seed: int = typer.Option(0, help="Seeds the benchmark, the models and every sample."),
    seeds: Optional[str] = typer.Option(None, help="Several seeds (e.g. 0-4 or 0,2,5): one run each in OUT/s<seed> "
                                                   "(OUT defaults to runs/seeds), then the table over them "
                                                   "(mean ± std, each seed against the goals) in OUT/table.md."),
    ablations: bool = typer.Option(False, "--ablations", help="Also run the paper's ablations (blind.enabled and every "
                                                             "ablations.<name>) and report their table."),
    quick: bool = typer.Option(False, "--quick", help="Every stage on a small slice (well under 3 minutes): checks "
                                                      "the machinery, not the method."),
    out: Optional[str] = typer.Option(None, help="Run folder (default runs/demo, or runs/demo-quick with --quick)."),
    force: list[str] = typer.Option([], help="Redo this stage and every stage that depends on it (repeatable)."),
):
    """The whole method end to end on the embedded default (MiniMMEB + a tiny Qwen3-VL-class backbone):
    pretrain, warm-up, candidate rationales, counterfactual selection, joint training, GRPO, the plug-in
    gate, a direct-only baseline beside it, evaluation of four systems, and runs/demo/report.md."""
    from .fileio import atomic_write_text, read_json
    from .pipeline import load_pipeline_config, run_pipeline
    from .pipeline.config import ABLATIONS
    from .pipeline.report import results_table, seeds_table

    start = time.perf_counter()
    switches = ["blind.enabled=true", *(f"ablations.{name}=true" for name in ABLATIONS)] if ablations else []
    if seeds is None:
        cfg = load_pipeline_config(None, switches, quick=quick, seed=seed,
                                   out=out or ("runs/demo-quick" if quick else "runs/demo"))
        run = run_pipeline(cfg, forced=force)
        report = read_json(run.root / "report.json")
        typer.echo(f"\nMiniMMEB test, seed {report['seed']} (the whole pipeline: {report['seconds'] / 60:.1f} min)\n")
        typer.echo(results_table(report))
        typer.echo(f"\nreport: {run.root / 'report.md'} (this invocation: {time.perf_counter() - start:.0f}s)")
        return
    root = Path(out or "runs/seeds")
    reports = []
    for s in parse_seeds(seeds):
        typer.echo(f"[mmemb] seed {s}: {root / f's{s}'}")
        run = run_pipeline(load_pipeline_config(None, switches, quick=quick, seed=s, out=str(root / f"s{s}")),
                           forced=force)
        reports.append(read_json(run.root / "report.json"))
    table = seeds_table(reports)
    atomic_write_text(root / "table.md", table + "\n")
    typer.echo(f"\n{table}\n\ntable: {root / 'table.md'} (this invocation: {time.perf_counter() - start:.0f}s)")


def parse_seeds(spec: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; ranges and lists mix ('0-2,7')."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise typer.BadParameter(f"--seeds {spec!r}: give seeds as 0-4, 0,2,5 or 0-2,7") from None
    if not out:
        raise typer.BadParameter(f"--seeds {spec!r}: no seeds")
    return out


def main() -> None:
    app()


if __name__ == "__main__":
    main()
