"""The built-in task: turn a free-text shop order into one exact JSON object with fixed keys.

The base model answers with prose or with JSON of its own invention (other keys, words instead of numbers),
so it scores near 0% exact match; a few minutes of LoRA on CPU teach it the format. The data is generated
from a seed, so the demo needs no download and every run sees the same examples.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

ITEMS = ["lamp", "chair", "mug", "notebook", "backpack", "kettle", "scarf", "umbrella", "pillow", "candle",
         "towel", "clock", "vase", "blanket", "bottle", "jacket"]  # fmt: skip
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
CITIES = ["Oslo", "Lisbon", "Nairobi", "Lima", "Osaka", "Dublin", "Quito", "Hanoi", "Perth", "Tunis",
          "Bergen", "Porto", "Accra", "Kyoto", "Cork", "Riga"]  # fmt: skip
SPEEDS = {
    "express": ["express", "as fast as possible", "overnight"],
    "standard": ["standard", "normal", "regular"],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
TEMPLATES = [
    "Hi! Could you send {qty} {color} {items} to {city}? Shipping: {speed}.",
    "I need {qty} {items} in {color}, delivered to {city}, {speed} please.",
    "Order: {qty} x {color} {items}. Ship {speed} to {city}.",
    "Please ship {qty} {color} {items} to my address in {city} ({speed} delivery).",
    "{city} office here - we want {qty} {color} {items}, {speed} shipping.",
    "Can I get {qty} {items}, colour {color}? Deliver to {city} with {speed} shipping.",
]
INSTRUCTION = "Extract the order as JSON."


def _plural(item: str, qty: int) -> str:
    return item if qty == 1 else item + "s"


def make_example(rng: random.Random) -> dict[str, str]:
    item, color, city = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES)
    speed = rng.choice(sorted(SPEEDS))
    qty = rng.randint(1, 9)
    qty_text = str(qty) if qty == 1 or rng.random() < 0.5 else NUMBER_WORDS[qty]
    text = rng.choice(TEMPLATES).format(
        qty=qty_text, color=color, items=_plural(item, qty), city=city, speed=rng.choice(SPEEDS[speed])
    )
    answer = {"item": item, "color": color, "quantity": qty, "city": city, "shipping": speed}
    return {"instruction": INSTRUCTION, "input": text, "output": json.dumps(answer)}


def make_dataset(n_train: int = 480, n_eval: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples; the held-out inputs never appear in training."""
    return distinct_examples(make_example, n_train, n_eval, seed)


def distinct_examples(
    make: Callable[[random.Random], dict[str, str]], n_train: int, n_eval: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """`n_train` + `n_eval` examples from `make` with distinct inputs (shared by every demo task)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        row = make(rng)
        if row["input"] not in seen:
            seen.add(row["input"])
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def prompt_for(row: dict[str, str]) -> str:
    """The user message for a row, rendered as the data loader renders instruction + input."""
    return f"{row['instruction']}\n\n{row['input']}"


def is_correct(answer: str, row: dict[str, str]) -> bool:
    """Exact match of the parsed JSON object (key order and spacing do not matter)."""
    try:
        return json.loads(answer.strip()) == json.loads(row["output"])
    except (json.JSONDecodeError, TypeError):
        return False
