"""MiniMMEB's tasks: what each query asks, its answer, and the reasoning that solves it.

Everything here is text and arithmetic over digit labels; :mod:`mmemb.data.minimmeb` renders
the scans into images and writes the benchmark. Kept separate so the tokenizer corpus and the
benchmark teacher can use the task logic without building images.

Meta-tasks mirror MMEB: *easy* tasks (classification, retrieval both ways, grounding) only need
the digits to be read; *compositional* tasks need arithmetic over several digits, where a short
step-by-step rationale ("digits 8 7 6. 8+7=15. 15+6=21.") lets a small model get the exact answer
that it cannot compute in one shot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ORDINALS = ["first", "second", "third", "fourth"]

EASY, COMPOSITIONAL = "easy", "compositional"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    meta_task: str  # MMEB meta-task: classification, retrieval, grounding, vqa
    kind: str  # easy | compositional
    qry_inst: str
    tgt_inst: str
    n_digits: tuple[int, int]  # query digits, inclusive range
    n_candidates: int
    query_is_image: bool = True
    target_is_image: bool = False


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("DigitClass", "classification", EASY,
                 "Represent the given image for classification.", "Represent the class label.", (1, 1), 10),
        TaskSpec("DigitCaption-I2T", "retrieval", EASY,
                 "Represent the given image for caption retrieval.", "Represent the given caption.", (2, 4), 16),
        TaskSpec("DigitCaption-T2I", "retrieval", EASY,
                 "Represent the given caption for image retrieval.", "Represent the given image.", (2, 4), 16,
                 query_is_image=False, target_is_image=True),
        TaskSpec("DigitGround", "grounding", EASY,
                 "Represent the given image with the following question:", "Represent the given cropped digit.",
                 (3, 4), 10, target_is_image=True),
        TaskSpec("DigitSum", "vqa", COMPOSITIONAL,
                 "Represent the given image with the following question:", "Represent the given text answer.",
                 (3, 4), 20),
        TaskSpec("DigitExpr", "vqa", COMPOSITIONAL,
                 "Represent the given image with the following question:", "Represent the given text answer.",
                 (3, 3), 20),
    ]
}

SUM_QUESTION = "What is the sum of the digits?"
EXPR_QUESTION = "Add the first two digits, then multiply by the last digit."


def caption(digits: list[int]) -> str:
    return " ".join(str(d) for d in digits)


def ground_question(position: int) -> str:
    return f"Select the {ORDINALS[position]} digit from the left."


def query_text(task: str, digits: list[int], position: int | None = None) -> str:
    """The text part of a query (empty for pure image queries)."""
    if task == "DigitCaption-T2I":
        return caption(digits)
    if task == "DigitGround":
        assert position is not None
        return ground_question(position)
    if task == "DigitSum":
        return SUM_QUESTION
    if task == "DigitExpr":
        return EXPR_QUESTION
    return ""


def answer(task: str, digits: list[int], position: int | None = None) -> str | int:
    """The positive target: text for text targets, the digit class for image targets."""
    if task == "DigitClass":
        return WORDS[digits[0]]
    if task in ("DigitCaption-I2T", "DigitCaption-T2I"):
        return caption(digits)
    if task == "DigitGround":
        assert position is not None
        return digits[position]
    if task == "DigitSum":
        return str(sum(digits))
    if task == "DigitExpr":
        a, b, c = digits
        return str((a + b) * c)
    raise KeyError(task)


def faithful_steps(task: str, digits: list[int], position: int | None = None) -> list[str]:
    """The correct reasoning, one sentence per step."""
    read = f"digits {caption(digits)}."
    if task == "DigitClass":
        return [f"the digit is {digits[0]}."]
    if task in ("DigitCaption-I2T", "DigitCaption-T2I"):
        return [read]
    if task == "DigitGround":
        assert position is not None
        return [read, f"the {ORDINALS[position]} is {digits[position]}."]
    if task == "DigitSum":
        steps, total = [read], digits[0]
        for d in digits[1:]:
            steps.append(f"{total}+{d}={total + d}.")
            total += d
        return steps
    if task == "DigitExpr":
        a, b, c = digits
        return [read, f"{a}+{b}={a + b}.", f"{a + b}*{c}={(a + b) * c}."]
    raise KeyError(task)


def rationale_from_steps(steps: list[str]) -> str:
    return " ".join(steps)


def text_negatives(task: str, digits: list[int], n: int, rng: random.Random) -> list[str]:
    """Hard text distractors for a query's positive text (same form, wrong content)."""
    pos = answer(task, digits)
    out: list[str] = []
    if task == "DigitClass":
        out = [w for w in WORDS if w != pos]
        rng.shuffle(out)
    elif task == "DigitCaption-I2T":
        seen = {pos}
        while len(out) < n:
            cand = _perturb_digits(digits, rng)
            c = caption(cand)
            if c not in seen:
                seen.add(c)
                out.append(c)
    else:  # numeric answers: the nearest other numbers, so only an exact answer ranks first
        value = int(pos)
        lo = max(0, value - n)
        pool = [v for v in range(lo, lo + 2 * n + 1) if v != value]
        pool.sort(key=lambda v: (abs(v - value), v))
        out = [str(v) for v in pool[:n]]
        rng.shuffle(out)
    return out[:n]


def digit_negatives(digits: list[int], n: int, rng: random.Random) -> list[list[int]]:
    """Distractor digit strings for text-to-image retrieval (one digit changed, swaps, random)."""
    seen, out = {tuple(digits)}, []
    while len(out) < n:
        cand = _perturb_digits(digits, rng)
        if tuple(cand) not in seen:
            seen.add(tuple(cand))
            out.append(cand)
    return out


def _perturb_digits(digits: list[int], rng: random.Random) -> list[int]:
    cand = list(digits)
    r = rng.random()
    if r < 0.6:  # one digit changed
        i = rng.randrange(len(cand))
        cand[i] = rng.choice([d for d in range(10) if d != cand[i]])
    elif r < 0.8 and len(set(cand)) > 1:  # two positions swapped
        i, j = rng.sample(range(len(cand)), 2)
        cand[i], cand[j] = cand[j], cand[i]
    else:
        cand = [rng.randrange(10) for _ in cand]
    return cand


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    """Text in the benchmark's vocabulary: instructions, questions, answers and rationales."""
    rng = random.Random(seed)
    lines = [t.qry_inst for t in TASKS.values()] + [t.tgt_inst for t in TASKS.values()]
    lines += [SUM_QUESTION, EXPR_QUESTION, " ".join(WORDS)] + [ground_question(i) for i in range(4)]
    lines += [str(v) for v in range(200)]
    for _ in range(n):
        task = rng.choice(list(TASKS))
        spec = TASKS[task]
        digits = [rng.randrange(10) for _ in range(rng.randint(*spec.n_digits))]
        pos = rng.randrange(len(digits)) if task == "DigitGround" else None
        lines.append(query_text(task, digits, pos))
        lines.append(rationale_from_steps(faithful_steps(task, digits, pos)))
    return [line for line in lines if line]
