"""A second built-in task, for the many-adapters demo: write a date given in words as an ISO date.

"the fifth of March, 2021" -> "2021-03-05". Distinct from the order task in its inputs and its answers, so
two adapters, one per task, can be told apart by a router and checked each on its own held-out set.
"""

from __future__ import annotations

import random

from qlora_lite.demo.task import distinct_examples, prompt_for  # noqa: F401 (prompt_for re-exported)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
TEMPLATES = [
    "{month} {day}, {year}",
    "the {day_th} of {month} {year}",
    "{day} {month} {year}",
    "{month} {day_th}, {year}",
    "on {weekday}, {month} {day}, {year}",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INSTRUCTION = "Write this date as YYYY-MM-DD."


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def make_example(rng: random.Random) -> dict[str, str]:
    year, month, day = rng.randint(1950, 2035), rng.randint(1, 12), rng.randint(1, 28)
    text = rng.choice(TEMPLATES).format(
        month=MONTHS[month - 1], day=day, day_th=_ordinal(day), year=year, weekday=rng.choice(WEEKDAYS)
    )
    return {"instruction": INSTRUCTION, "input": text, "output": f"{year:04d}-{month:02d}-{day:02d}"}


def make_dataset(n_train: int = 480, n_eval: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples; the held-out inputs never appear in training."""
    return distinct_examples(make_example, n_train, n_eval, seed)


def is_correct(answer: str, row: dict[str, str]) -> bool:
    return answer.strip() == row["output"]
