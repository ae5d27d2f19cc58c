"""``mmemb rl``: GRPO that teaches the model when to reason.

Each step samples Q training queries and G completions per query from the current policy (the
first assistant token decides: <emb> ends the completion, <think> continues to </think> or the
budget), embeds each completion at its <emb>, and rewards it:

    reward = 1 / rank(positive | completion's embedding, the batch's targets)   retrieval reward
             - cost * reasoning_tokens / budget                                  reasoning must pay
             - malformed_penalty * [budget hit before </think>]

The retrieval reward is the reciprocal rank of the positive among the step's targets (one task
per step, with the pairs' hard negatives, so the ranking is as hard as evaluation's). We chose it
over the log-probability of the positive (``reward="logprob"``): both grade every completion, but
the log-probability punishes a confident mistake far more than it rewards a confident hit, so a
hedging direct embedding can out-score reasoning that is right more often; the reciprocal rank
moves with what evaluation counts (the top of the ranking), bounded in [0, 1], so the cost of
reasoning is in the same units: reasoning must buy rank. ``reward="delta"`` is the paper's: the
utility gap of the chosen action, s(completion) - s(the query's direct embedding) with s the
log-probability of the positive (0 for a completion that does not reason). s(direct) is the same
for every completion of a group, so once advantages are centred per group it moves the policy as
``logprob`` does; only the logged reward differs.
The update is GRPO (group-normalised advantages, clipped ratio, k3 KL to the frozen joint
checkpoint), plus an optional direct-path InfoNCE term that keeps embeddings aligned while the
policy moves.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import trange

from ..data.pairs import read_pairs
from ..fileio import JsonlAppender, atomic_dir, iter_jsonl, read_json, write_json
from ..items import Pair, load_visuals
from ..model.backbone import Backbone, load_backbone
from ..model.embedder import Embedder
from ..model.generation import Reasoner, SamplingConfig
from ..model.prompts import render_prompt
from ..model.teacher_forcing import build_forced_batch, forced_forward
from ..train.config import parse_override
from ..train.losses import info_nce, target_masks
from .grpo_objective import group_advantages, grpo_loss
from .rollout import choose_depths, completion_logprobs, sample_groups, with_close_targets


@dataclass
class RLConfig:
    model: str = ""  # the joint-training checkpoint (also the KL reference)
    out: str = "runs/rl"
    data: list[str] = field(default_factory=list)  # pair specs (files, globs, benchmark folders)
    steps: int = 40
    queries_per_step: int = 16
    group_size: int = 8
    lr: float = 2e-4
    epsilon: float = 0.2
    beta: float = 0.04
    # Advantages centred per group but not divided by the group's std (Dr. GRPO, TRL's
    # scale_rewards="none"). With the std, a group where reasoning is only slightly worse (its token
    # cost) pushes "don't reason" as hard as one where it is much worse; on MiniMMEB the many such
    # easy-task groups dragged p(<think>) down on the compositional tasks too (shared weights).
    scale_advantages: bool = False
    # Rationale tokens are sampled (and their log-probs taken) at this temperature; the decision at 1.
    # 0 (the default): rationales are decoded greedily, as inference does, so a group contrasts
    # reasoning and not reasoning exactly as they will play out (the reasoning-utility gap, online),
    # and the policy gradient moves the decision only. Sampled rationales of a small model are
    # often wrong, which made reasoning look worse than the greedy reasoning inference does.
    temperature: float = 0.0
    max_reasoning_tokens: int = 64
    compile: bool | None = None  # rollouts decode with the compiled step (False: eager; None: $MMEMB_COMPILE)
    reward: str = "mrr"  # mrr (reciprocal rank of the positive) | logprob (log p of the positive) | delta (the paper's)
    # Learned depth: a reasoning completion may also close its rationale after any of its sentences,
    # with the policy's own p(</think>) there (rollout.choose_depths); the cost term prices each depth.
    depth: bool = False
    reward_temperature: float = 0.02  # for the logprob reward and the direct NCE term
    one_task_per_step: bool = True  # each step's queries from one dataset: targets as hard as evaluation's
    cost: float = 0.1  # lambda: reward lost by a completion that uses the whole budget
    malformed_penalty: float = 1.0
    nce_weight: float = 0.5  # direct-path InfoNCE beside the policy loss (0 = off)
    grad_clip: float = 1.0
    save_every: int = 10
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    # LoRA on the policy (keys of mmemb.train.config.LoraConfig, e.g. {rank: 16, alpha: 32}); None = all
    # weights train. With LoRA the reference is the policy with its adapter switched off (no second copy).
    lora: dict | None = None


def run_rl(cfg: RLConfig, resume: bool = True, show_progress: bool = True) -> Path:
    """Train; return the final checkpoint folder (``out/model``). Resumes from ``out/last``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    state_path = out / "last"
    start_step = 0
    source = cfg.model
    if resume and (state_path / "rl_state.json").is_file():
        start_step = read_json(state_path / "rl_state.json")["step"]
        source = str(state_path)
    elif (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()  # a fresh run starts a fresh log
    write_json(out / "rl_config.json", asdict(cfg))

    policy = load_backbone(source, device=cfg.device, dtype=cfg.dtype)
    if cfg.lora and not start_step:
        from ..train.config import LoraConfig, TrainConfig
        from ..train.params import apply_lora

        apply_lora(policy, TrainConfig(model=cfg.model, lora=LoraConfig(enabled=True, **cfg.lora)))
    reference = None if cfg.lora else load_backbone(cfg.model, device=cfg.device, dtype=cfg.dtype).eval()
    if reference is not None:
        reference.requires_grad_(False)
    policy.train()
    reasoner = Reasoner(policy, compile=cfg.compile)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    pairs = [p for spec in cfg.data for p in read_pairs(spec)]
    if not pairs:
        raise ValueError("rl: no training pairs (check --data)")
    if cfg.reward not in REWARDS:
        raise ValueError(f"rl: reward must be one of {', '.join(REWARDS)}, not {cfg.reward!r}")
    by_task: dict[str, list[Pair]] = {}
    for p in pairs:
        by_task.setdefault(p.dataset if cfg.one_task_per_step else "all", []).append(p)
    tasks = sorted(by_task)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if start_step:
        rng.setstate(_tuple_state(read_json(state_path / "rl_state.json")["python_rng"]))
        # weights_only: tensors and plain containers only; a tampered file cannot run code when loaded
        gen.set_state(torch.load(state_path / "torch_rng.pt", weights_only=True))
        opt.load_state_dict(torch.load(state_path / "optimizer.pt", weights_only=True))
    sampling = SamplingConfig(max_tokens=cfg.max_reasoning_tokens, temperature=cfg.temperature, generator=gen)

    with JsonlAppender(out / "log.jsonl") as log:
        for step in trange(start_step, cfg.steps, desc="rl (GRPO)", disable=not show_progress,
                           initial=start_step, total=cfg.steps):
            group = by_task[rng.choice(tasks)]
            batch = rng.sample(group, min(cfg.queries_per_step, len(group)))
            record = rl_step(policy, reference, reasoner, opt, batch, sampling, gen, cfg)
            record["step"] = step + 1
            log.write(record)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save_state(policy, opt, rng, gen, step + 1, state_path)
    final = out / "model"
    if cfg.lora:  # the final policy as a plain checkpoint: the adapter merged into the weights
        policy.model = policy.model.merge_and_unload()
    with atomic_dir(final) as tmp:
        policy.save_pretrained(tmp)
    plot_rl_log(out / "log.jsonl", out / "rl_curves.png")
    return final


def rl_step(policy: Backbone, reference: Backbone | None, reasoner: Reasoner, opt, batch: list[Pair],
            sampling: SamplingConfig, gen: torch.Generator, cfg: RLConfig) -> dict:
    t0 = time.perf_counter()
    queries = [p.query for p in batch]
    target_items, positive = _targets(batch)
    targets = torch.from_numpy(Embedder(policy).encode(target_items, mode="direct", on_error="raise").embeddings)

    prompts = [render_prompt(policy.processor, q) for q in queries]
    visuals = [load_visuals(q) for q in queries]
    policy.eval()
    ro = sample_groups(policy, reasoner, queries, cfg.group_size, sampling, gen, prompts=prompts, visuals=visuals)
    if cfg.depth:
        ro = choose_depths(policy, reasoner, ro, prompts, visuals, gen)
    policy.train()
    direct = None  # the queries' direct pass: the NCE term's input, s(direct) of the delta reward
    if cfg.nce_weight > 0 or cfg.reward == "delta":
        with torch.set_grad_enabled(cfg.nce_weight > 0):
            direct = forced_forward(policy, policy, build_forced_batch(policy, prompts, visuals, [None] * len(queries)))
    retrieval = retrieval_reward(ro.embeddings, targets, positive[ro.owners], cfg.reward, cfg.reward_temperature,
                                 direct=None if direct is None else direct.embeddings.detach()[ro.owners])
    cost = cfg.cost * ro.reasoning_tokens / max(1, cfg.max_reasoning_tokens)
    malformed = (~ro.closed).float()
    rewards = retrieval - cost - cfg.malformed_penalty * malformed
    adv = group_advantages(rewards, cfg.group_size, scale=cfg.scale_advantages)

    owners = ro.owners.tolist()
    forced = build_forced_batch(policy, [prompts[o] for o in owners], [visuals[o] for o in owners], ro.rationale_ids)
    if ro.stops is not None:  # the choices at sentence ends are the policy's, the tokens between greedy
        forced = with_close_targets(forced, [[j for j, _ in row] for row in ro.stops], policy.ids.end_think)
    banned = reasoner.banned
    greedy = not cfg.temperature
    out = forced_forward(policy, policy, forced, banned=banned, temperature=cfg.temperature or 1.0)
    logp, mask = completion_logprobs(out, ro, decision_only=greedy)
    with torch.no_grad(), _reference(policy, reference) as ref:
        ref_out = forced_forward(ref, ref, forced, banned=banned, temperature=cfg.temperature or 1.0)
        ref_logp, _ = completion_logprobs(ref_out, ro, decision_only=greedy)
    terms = grpo_loss(logp, logp.detach(), ref_logp, mask, adv, cfg.epsilon, cfg.beta)
    loss = terms.loss
    nce = torch.zeros(())
    if cfg.nce_weight > 0:
        counted = torch.ones(len(target_items), dtype=torch.bool)
        nce, _ = info_nce(direct.embeddings, targets, positive, counted, cfg.reward_temperature)
        loss = loss + cfg.nce_weight * nce
    if not torch.isfinite(loss):
        raise FloatingPointError(f"rl: non-finite loss {loss.item()}; the last saved state is kept")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    opt.step()

    think = ro.think.float()
    per_task: dict[str, list[float]] = {}
    for o, t in zip(owners, think.tolist()):
        per_task.setdefault(batch[o].dataset, []).append(t)
    n_think = int(ro.think.sum())
    return {
        "loss": float(loss.detach()), "policy_loss": float(terms.policy.detach()), "kl": float(terms.kl.detach()),
        "nce": float(nce.detach()),
        "reward": float(rewards.mean()), "retrieval_reward": float(retrieval.mean()),
        "invocation": float(think.mean()),
        "invocation_per_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())},
        "p_think": float(ro.p_think.mean()),
        "reasoning_tokens": float(ro.reasoning_tokens.sum() / max(1, n_think)),
        "malformed": float(malformed.mean()), "clipped": float(terms.clipped_share),
        "grad_norm": float(grad_norm), "seconds": time.perf_counter() - t0,
    }


@contextlib.contextmanager
def _reference(policy: Backbone, reference: Backbone | None):
    """The frozen reference: a separate copy, or (LoRA) the policy with its adapter off."""
    if reference is not None:
        yield reference
    else:
        with policy.model.disable_adapter():
            yield policy


REWARDS = ("mrr", "logprob", "delta")


def retrieval_reward(emb: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor, kind: str,
                     temperature: float, direct: torch.Tensor | None = None) -> torch.Tensor:
    """Per completion: 1 / (rank of its best positive), log p(positives), or (``delta``) log p(positives)
    minus that of ``direct``, its query's direct embedding (see the module docstring)."""
    if kind == "delta":
        if direct is None:
            raise ValueError("the delta reward needs each completion's direct embedding")
        return (retrieval_reward(emb, targets, positive, "logprob", temperature)
                - retrieval_reward(direct, targets, positive, "logprob", temperature))
    scores = emb @ targets.T
    if kind == "logprob":
        logits = scores / temperature
        return torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1) - torch.logsumexp(logits, 1)
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
    ahead = ((scores > best) & ~positive).sum(1)  # negatives ranked above the best positive
    return 1.0 / (1.0 + ahead.float())


def _targets(batch: list[Pair]) -> tuple[list, torch.Tensor]:
    """The batch's distinct targets (positives and hard negatives) and the positives mask
    (queries x targets): the trainer's rule, so queries of equal content share their positives."""
    ids: dict[tuple, int] = {}
    items = []
    for p in batch:
        for it in [p.positive, *p.negatives]:
            if it.content_key() not in ids:
                ids[it.content_key()] = len(items)
                items.append(it)
    key = lambda it: ids.setdefault(it.content_key(), len(ids))  # noqa: E731
    query_keys = torch.tensor([key(p.query) for p in batch])
    positive, _ = target_masks(torch.arange(len(batch)), query_keys, torch.tensor([key(p.positive) for p in batch]),
                               torch.arange(len(items)))
    return items, positive


def _save_state(policy: Backbone, opt, rng: random.Random, gen: torch.Generator, step: int, path: Path) -> None:
    with atomic_dir(path) as tmp:
        policy.save_pretrained(tmp)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(gen.get_state(), tmp / "torch_rng.pt")
        write_json(tmp / "rl_state.json", {"step": step, "python_rng": rng.getstate()})


def _tuple_state(state):
    return tuple(_tuple_state(s) if isinstance(s, list) else s for s in state)


def plot_rl_log(log_path: Path, png: Path, window: int = 8) -> None:
    """Reward, KL, invocation per task and reasoning length per step, with moving averages
    (each step draws its queries from one task, so raw curves jump from task to task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(iter_jsonl(log_path))
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])

    def smooth(values):  # centred moving average that skips missing points
        v = np.asarray(values, dtype=float)
        out = np.full_like(v, np.nan)
        for i in range(len(v)):
            w = v[max(0, i - window // 2): i + window // 2 + 1]
            if (~np.isnan(w)).any():
                out[i] = np.nanmean(w)
        return out

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in ((axes[0], "reward", "mean reward"), (axes[1], "kl", "KL to reference")):
        v = [r[key] for r in rows]
        ax.plot(steps, v, color="gray", alpha=0.35, linewidth=1)
        ax.plot(steps, smooth(v), linewidth=2, label=f"moving average ({window} steps)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    for task in sorted({t for r in rows for t in r["invocation_per_task"]}):
        pts = [(r["step"], r["invocation_per_task"][task]) for r in rows if task in r["invocation_per_task"]]
        axes[2].plot(*zip(*pts), "-o", markersize=2, label=task, alpha=0.8)
    axes[2].set_title("invocation ratio per task (steps on that task)")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].legend(fontsize=6)
    tokens = [r["reasoning_tokens"] if r["invocation"] > 0 else np.nan for r in rows]
    axes[3].plot(steps, tokens, "o", color="gray", markersize=2, alpha=0.5)
    axes[3].plot(steps, smooth(tokens), linewidth=2)
    axes[3].set_title("reasoning tokens (completions that reasoned)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def load_rl_config(path: str | Path, overrides: list[str] = ()) -> RLConfig:
    import yaml

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {} if path else {}
    raw = raw.get("rl", raw)
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return RLConfig(**raw)

