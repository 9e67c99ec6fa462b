"""Classification data: labels -> ids, a stratified held-out split, class weights, and the checks that keep a
run's label mapping from changing under it. Everything here runs before a model or file is touched.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_lite.data import formats as data_mod
from qlora_lite.data.encoding import IGNORE_INDEX
from qlora_lite.errors import UserError
from qlora_lite.training.evaluation import format_distribution, label_distribution

log = logging.getLogger(__name__)

IMBALANCE_WARNING = 3.0  # largest / smallest class count at which class weights are suggested


@dataclass(frozen=True)
class ClassifierExample:
    """One tokenized text and its label id."""

    input_ids: list[int]
    label: int

    @property
    def labels(self) -> tuple[int, int]:
        """One target per example, in the shape `loop.supervised_tokens` counts (it skips position 0)."""
        return (IGNORE_INDEX, self.label)


def canonical_label(value: Any) -> Any:
    """Integral floats (1.0 from pandas) become ints; strings are stripped; other values stay."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value.strip()
    return value


def _sort_key(label: Any) -> tuple:
    if isinstance(label, int) and not isinstance(label, bool):
        return (0, label, "")
    text = str(label)
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


@dataclass(frozen=True)
class LabelMapping:
    """Label values in id order. Names in configs and JSON are `str(value)`; predictions return the values."""

    names: tuple

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, train_labels: Sequence[Any], explicit: Sequence[Any] | None = None) -> LabelMapping:
        if explicit is None:
            values = {canonical_label(v) for v in train_labels}
            if len({type(v) for v in values}) > 1:  # e.g. 1 and "2": compare them as text
                values = {str(v) for v in values}
            return cls(tuple(sorted(values, key=_sort_key)))
        names = tuple(canonical_label(v) for v in explicit)
        dupes = sorted({str(v) for v in names if names.count(v) > 1})
        if dupes:
            raise UserError(f"labels= lists {', '.join(dupes)} more than once: give each label once")
        return cls(names)

    @property
    def id2label(self) -> dict[int, str]:
        return {i: str(name) for i, name in enumerate(self.names)}

    @property
    def label2id(self) -> dict[str, int]:
        return {str(name): i for i, name in enumerate(self.names)}

    def id_of(self, label: Any) -> int | None:
        return self.label2id.get(str(canonical_label(label)))

    def config_kwargs(self, pad_token_id: int | None) -> dict[str, Any]:
        """Keywords for `AutoModelForSequenceClassification.from_pretrained(base, **kwargs)`."""
        return {
            "num_labels": len(self.names),
            "id2label": self.id2label,
            "label2id": self.label2id,
            "pad_token_id": pad_token_id,
        }

    def to_file(self, pad_token_id: int | None) -> dict[str, Any]:
        return {**self.config_kwargs(pad_token_id), "names": list(self.names)}

    @classmethod
    def from_file(cls, data: Mapping) -> LabelMapping:
        return cls(tuple(data["names"]))


@dataclass
class LabeledData:
    spec: Any
    mapping: LabelMapping
    train: list[tuple[str, Any]]  # (text, canonical label)
    eval: list[tuple[str, Any]]
    fingerprint: str
    n_records: int
    source: Any = None  # what the records came from (a Hub data set: pinned to its commit)

    @property
    def train_ids(self) -> list[int]:
        return [self.mapping.id_of(y) for _, y in self.train]

    def distribution(self) -> dict[str, dict[str, int]]:
        names = [str(n) for n in self.mapping.names]
        return {
            "train": label_distribution([str(y) for _, y in self.train], names),
            "eval": label_distribution([str(y) for _, y in self.eval], names),
        }


def stratified_split(
    pairs: list[tuple[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Hold out about `eval_fraction` of every class (never a class's last example); keeps the order."""
    if eval_fraction <= 0 or len(pairs) < 4:
        return list(pairs), []
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, (_, label) in enumerate(pairs):
        by_class[str(label)].append(i)
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(by_class):
        members = by_class[label]
        chosen.update(rng.sample(members, min(round(len(members) * eval_fraction), len(members) - 1)))
    if not chosen:  # small data: still hold out one example of the largest class
        largest = max(by_class.values(), key=len)
        if len(largest) > 1:
            chosen.add(rng.choice(largest))
    train = [p for i, p in enumerate(pairs) if i not in chosen]
    held = [p for i, p in enumerate(pairs) if i in chosen]
    return train, held


def _pairs(source: Any, config, where: str) -> tuple[list[dict], Any, list[tuple[str, Any]]]:
    records = data_mod.load_records(source)
    spec = data_mod.detect_format(records, format=config.format or "classification", columns=config.columns)
    if spec.task != "classification":
        raise UserError(f"{where}: format {spec.name!r} has no labels; use format='classification'")
    pairs = [(text, canonical_label(label)) for text, label in data_mod.to_labeled_texts(records, spec)]
    log.info("%s: %d labelled texts (%s)", where, len(pairs), spec.reason)
    return records, spec, pairs


def load_labeled_data(config, *, labels: Sequence[Any] | None = None, eval_data: Any = None) -> LabeledData:
    """Load, validate and split; map labels to ids. Raises UserError for every data problem, naming it."""
    from qlora_lite.data.hub_dataset import pin_data_source

    data = pin_data_source(config.data, config.data_config, config.data_split)  # a Hub data set: its commit
    records, spec, pairs = _pairs(data, config, "data")
    label_col = spec.columns["label"]
    if eval_data is not None:
        eval_records, _, held = _pairs(eval_data, config, "eval data")
        train = pairs
        fingerprint = data_mod.fingerprint(records + eval_records, spec)
    else:
        train, held = stratified_split(pairs, config.eval_fraction, config.seed)
        fingerprint = data_mod.fingerprint(records, spec)
    present = {str(y) for _, y in train}
    if len(present) < 2:
        only = next(iter(present), "(none)")
        raise UserError(
            f"label column {label_col!r} holds a single class ({only!r}) in the {len(train)} training texts: "
            "a classifier needs at least two; add examples of the other classes"
        )
    mapping = LabelMapping.build([y for _, y in train], labels)
    for i, (_, y) in enumerate(train, start=1):
        if mapping.id_of(y) is None:
            raise UserError(
                f"training text {i}: label {y!r} is not in labels={list(mapping.names)}; add it there"
            )
    unused = [n for n in mapping.names if str(n) not in present]
    if unused:
        raise UserError(f"labels {unused} have no training examples: add some, or leave them out of labels=")
    unseen = Counter(str(y) for _, y in held if mapping.id_of(y) is None)
    if unseen:
        which = ", ".join(f"{k!r} ({v}x)" for k, v in unseen.most_common())
        raise UserError(
            f"eval labels {which} never appear in the training data ({label_col!r}); "
            "add training examples of them or drop them from the eval set"
        )
    return LabeledData(spec, mapping, train, held, fingerprint, len(records), data)


def resolve_class_weights(spec: Any, mapping: LabelMapping, train_ids: Sequence[int]) -> list[float] | None:
    """None, "balanced" (n / (classes * count), as scikit-learn) or {label: weight} -> one weight per id."""
    if spec is None:
        return None
    counts = Counter(train_ids)
    if spec == "balanced":
        return [round(len(train_ids) / (len(mapping) * counts[i]), 6) for i in range(len(mapping))]
    if isinstance(spec, Mapping):
        weights = [1.0] * len(mapping)
        for label, weight in spec.items():
            i = mapping.id_of(label)
            if i is None:
                raise UserError(
                    f"class_weights names {label!r}, not a label; labels are {list(mapping.names)}"
                )
            if not isinstance(weight, (int, float)) or weight <= 0:
                raise UserError(f"class_weights[{label!r}] = {weight!r}: give a positive number")
            weights[i] = float(weight)
        return weights
    raise UserError(f"class_weights={spec!r}: use None, 'balanced' or a dict {{label: weight}}")


def log_distribution(data: LabeledData, weights: list[float] | None) -> None:
    """Log the label table; warn when classes are imbalanced and no weights are set."""
    dist = data.distribution()
    log.info("label distribution:\n%s", format_distribution(dist))
    counts = [c for c in dist["train"].values() if c]
    if weights is None and max(counts) >= IMBALANCE_WARNING * min(counts):
        log.warning(
            "labels are imbalanced (largest class %d texts, smallest %d): consider class_weights='balanced' "
            "(--class-weights balanced)",
            max(counts),
            min(counts),
        )


def _mismatch(where: str, saved: Sequence[Any], mapping: LabelMapping) -> None:
    if [str(n) for n in saved] != [str(n) for n in mapping.names]:
        raise UserError(
            f"{where} was trained with labels {list(saved)} (in id order), but this data gives "
            f"{list(mapping.names)}: pass labels={list(saved)} to continue it, or overwrite=True "
            "(--overwrite) to start a new classifier"
        )


def check_saved_labels(record_path: Path, mapping: LabelMapping) -> None:
    """Refuse to reuse a finished classifier run whose label mapping differs (nothing is touched)."""
    if not record_path.is_file():
        return
    import json

    record = json.loads(record_path.read_text())
    saved = (record.get("labels") or {}).get("names")
    if record.get("task") == "classification" and saved is not None:
        _mismatch(str(record_path.parent), saved, mapping)


def check_checkpoint_labels(info, mapping: LabelMapping) -> None:
    """A checkpoint of a classifier with other labels cannot be resumed, not even with resume='force'."""
    saved = info.metadata.get("identity", {}).get("classification", {}).get("labels")
    if saved is not None:
        _mismatch(str(info.path), saved, mapping)


def encode(pairs: list[tuple[str, Any]], mapping: LabelMapping, tokenizer, max_length: int):
    """(examples, number truncated): token ids cut to `max_length` by the tokenizer (keeps [SEP] etc.)."""
    if not pairs:
        return [], 0
    texts = [t for t, _ in pairs]
    full = tokenizer(texts, truncation=False)["input_ids"]
    cut = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    examples = [
        ClassifierExample(list(ids), mapping.id_of(y)) for ids, (_, y) in zip(cut, pairs, strict=True)
    ]
    truncated = sum(1 for a, b in zip(full, cut, strict=True) if len(a) > len(b))
    if truncated:
        log.info("%d of %d texts truncated to %d tokens", truncated, len(pairs), max_length)
    return examples, truncated
