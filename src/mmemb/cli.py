"""The ``mmemb`` command: one verb per job. Heavy imports happen inside each verb."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

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
    from .tiny import build_tiny_backbone

    lines = corpus.read_text(encoding="utf-8").splitlines() if corpus else None
    path = build_tiny_backbone(arch, out, size=size, corpus=lines, vocab_size=vocab_size, seed=seed)
    typer.echo(f"wrote {arch} ({size}) backbone to {path}")


@app.command()
def encode(
    model: str = typer.Option(..., help="Checkpoint folder (or hub name when the hub is reachable)."),
    input: Path = typer.Option(..., "--input", help="JSONL: one item per line, e.g. "
                                                    '{"id": "q1", "text": "...", "image": "img.png", "instruction": "..."}'),
    output: Path = typer.Option(..., help="Output prefix: writes OUTPUT.npy (vectors) and OUTPUT.jsonl (per item)."),
    mode: str = typer.Option("auto", help="direct | reason | auto"),
    batch_size: int = typer.Option(32),
    think_threshold: float = typer.Option(0.5, help="auto mode: reason when p(<think>) >= this."),
    max_reasoning_tokens: int = typer.Option(128),
    max_reasoning_steps: Optional[int] = typer.Option(None, help="Stop reasoning after this many sentences."),
    on_error: str = typer.Option("skip", help="skip: report bad items and go on | raise: stop at the first."),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("auto"),
):
    """Encode items from a JSONL file (resumable: rerun after a kill to continue)."""
    from .embedder import Embedder
    from .encode_job import run_encode

    start = time.perf_counter()
    embedder = Embedder.from_pretrained(model, device=device, dtype=dtype, gate="auto")
    s = run_encode(embedder, input, output, mode=mode, batch_size=batch_size, think_threshold=think_threshold,
                   max_reasoning_tokens=max_reasoning_tokens, max_reasoning_steps=max_reasoning_steps,
                   on_error=on_error, show_progress=True)
    typer.echo(f"{s['items']} items, {s['failed']} failed, {s['reasoned_share']:.1%} reasoned, "
               f"{s['prompt_tokens']} prompt + {s['generated_tokens']} generated tokens, "
               f"{time.perf_counter() - start:.1f}s")


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

    from .train.config import ConfigError, load_config
    from .train.launch import launch_command, launched
    from .train.trainer import RunExists, TrainingDiverged, check_output_dir, train

    try:
        if (num_processes > 1 or accelerate_config) and not launched():
            check_output_dir(load_config(config, overrides or []), resume)  # fail here, not in N processes
            args = [f"--config={config}", *(["--resume"] if resume else []), *(overrides or [])]
            cmd = launch_command(args, num_processes, str(accelerate_config) if accelerate_config else None)
            raise typer.Exit(subprocess.call(cmd))
        final = train(config, overrides or [], resume=resume)
    except (ConfigError, RunExists, TrainingDiverged, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"final model: {final}")


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
def demo():
    """The whole method end to end on the embedded default (not yet available)."""
    typer.echo("mmemb demo: not yet available (the end-to-end demo lands with the demo issue).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
