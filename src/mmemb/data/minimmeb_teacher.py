"""MiniMMEB's benchmark teacher: candidate rationales of known, mixed quality.

It stands where the teacher MLLMs of a full-scale run stand, and it is part of the benchmark:
because each rationale's type is known, one can measure what the counterfactual selection keeps.

Types:
  faithful     the correct steps ("digits 8 7 6. 8+7=15. 15+6=21.")
  misread      one digit read wrong, the rest computed faithfully from it (a wrong answer)
  slip         digits right, one step wrong and carried on (arithmetic slip; on easy tasks the
               neighbouring position is reported, or two digits are swapped)
  format_only  reads like reasoning, says nothing about this image
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import minimmeb_tasks as T

TYPES = ("faithful", "misread", "slip", "format_only")

FORMAT_ONLY_TEXTS = [
    "let me look at the image carefully. i will work through it step by step. the answer follows from this.",
    "first i read the image. then i think about the question. so the answer is clear now.",
    "the image shows some digits. i check each one in order. that gives the result.",
    "i consider the question and the picture together. step by step the answer is found.",
]


@dataclass
class TeacherConfig:
    k: int = 4
    proportions: dict[str, float] = field(
        default_factory=lambda: {"faithful": 0.4, "misread": 0.2, "slip": 0.2, "format_only": 0.2})
    seed: int = 0


def candidate_rationales(meta: dict, k: int, proportions: dict[str, float], rng: random.Random) -> list[tuple[str, str]]:
    """K (type, text) candidates for one query, types drawn with the given proportions."""
    types = [t for t in TYPES if proportions.get(t, 0) > 0]
    weights = [proportions[t] for t in types]
    out = []
    for _ in range(k):
        kind = rng.choices(types, weights)[0]
        out.append((kind, rationale(kind, meta, rng)))
    return out


def rationale(kind: str, meta: dict, rng: random.Random) -> str:
    task, digits, pos = meta["task"], list(meta["digits"]), meta.get("position")
    if kind == "faithful":
        return T.rationale_from_steps(T.faithful_steps(task, digits, pos))
    if kind == "misread":
        return T.rationale_from_steps(T.faithful_steps(task, _misread(digits, pos, rng), pos))
    if kind == "slip":
        return _slip(task, digits, pos, rng)
    if kind == "format_only":
        return rng.choice(FORMAT_ONLY_TEXTS)
    raise ValueError(f"unknown rationale type {kind!r}")


def _misread(digits: list[int], position: int | None, rng: random.Random) -> list[int]:
    out = list(digits)
    i = position if position is not None else rng.randrange(len(out))  # grounding: misread the asked digit
    out[i] = rng.choice([d for d in range(10) if d != out[i]])
    return out


def _slip(task: str, digits: list[int], position: int | None, rng: random.Random) -> str:
    if task in ("DigitSum", "DigitExpr"):
        steps = T.faithful_steps(task, digits, position)
        k = rng.randrange(1, len(steps))  # an arithmetic step (step 0 reads the digits)
        return T.rationale_from_steps(steps[:k] + _slipped_tail(task, digits, k, rng))
    if task == "DigitGround" and len(digits) > 1:
        assert position is not None
        wrong = position + (1 if position + 1 < len(digits) else -1)
        return f"digits {T.caption(digits)}. the {T.ORDINALS[position]} is {digits[wrong]}."
    if task in ("DigitCaption-I2T", "DigitCaption-T2I") and len(set(digits)) > 1:
        swapped = list(digits)
        i = rng.randrange(len(swapped) - 1)
        while swapped[i] == swapped[i + 1]:
            i = (i + 1) % (len(swapped) - 1)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        return f"digits {T.caption(swapped)}."
    return T.rationale_from_steps(T.faithful_steps(task, _misread(digits, position, rng), position))


def _slipped_tail(task: str, digits: list[int], k: int, rng: random.Random) -> list[str]:
    """Steps k.. with step k's result off by 1-3 and the error carried on."""
    off = rng.choice([-3, -2, -1, 1, 2, 3])
    if task == "DigitSum":
        total = sum(digits[:k])  # the running total before step k is still right
        steps = []
        for j, d in enumerate(digits[k:]):
            result = total + d + (off if j == 0 else 0)
            result = max(result, 0)
            steps.append(f"{total}+{d}={result}.")
            total = result
        return steps
    a, b, c = digits
    if k == 1:
        s = max(a + b + off, 0)
        return [f"{a}+{b}={s}.", f"{s}*{c}={s * c}."]
    return [f"{a + b}*{c}={max((a + b) * c + off, 0)}."]
