"""Route a request to the adapter whose domain it belongs to, or to the base when unsure.

Three kinds, one interface (`route(text) -> Route(adapter, score, reason)`), saved as one JSON file:
- "centroid": each adapter's own training prompts (a sample kept in its run record) as a TF-IDF centroid;
  the request goes to the closest centroid by cosine similarity.
- "keywords": explicit rules, {adapter: [words]}; the adapter with the most matching words wins.
- "classifier": a trained classifier run whose labels name adapters.
A score below `threshold`, or a winner less than `margin` ahead of the runner-up, falls back to the base.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from qlora_lite.data.formats import prompt_sample
from qlora_lite.errors import UserError

FORMAT = 1
MAX_TERMS = 400  # per centroid: keeps the router file small; the tail of the weights barely moves a cosine
BASE_LABELS = ("base", "none", "")
# Function words carry no domain: without them, an off-topic request scores near zero against every adapter.
STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these "
    "those i you he she we they me my your our their what which who how do does did can could would should "
    "will please about into not no so than then there here".split()
)


class Route(NamedTuple):
    adapter: str | None  # None: the base model
    score: float
    reason: str


def terms(text: str) -> Counter:
    """Lower-case words and word pairs."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS]
    return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)])


def _normalise(vector: Mapping[str, float]) -> dict[str, float]:
    norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
    return {k: v / norm for k, v in vector.items()}


class Router:
    """`route(text)` -> Route(adapter or None, score, reason); `evaluate(held_out)`; `save(path)` / `load(path)`."""

    def __init__(self, kind: str, *, threshold: float, margin: float, **state: Any) -> None:
        if kind not in ("centroid", "keywords", "classifier"):
            raise UserError(f"router kind {kind!r} is not one of centroid, keywords, classifier")
        self.kind, self.threshold, self.margin, self.state = kind, float(threshold), float(margin), state
        self._classify: Callable[[str], dict] | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_samples(
        cls, samples: Mapping[str, Sequence[str]], *, threshold: float = 0.1, margin: float = 0.01
    ) -> Router:
        """A centroid router from example requests per adapter."""
        empty = [name for name, texts in samples.items() if not texts]
        if len(samples) < 1 or empty:
            raise UserError(
                f"no example texts for {', '.join(empty) or 'any adapter'}: give a few per adapter"
            )
        docs = [(name, terms(t)) for name, texts in samples.items() for t in texts]
        df = Counter(term for _, counts in docs for term in counts)
        idf = {term: math.log((1 + len(docs)) / (1 + n)) + 1.0 for term, n in df.items()}
        centroids = {}
        for name in samples:
            total: Counter = Counter()
            for doc_name, counts in docs:
                if doc_name == name:
                    total.update(_normalise({t: c * idf[t] for t, c in counts.items()}))
            top = dict(sorted(total.items(), key=lambda kv: -kv[1])[:MAX_TERMS])
            centroids[name] = _normalise(top)
        kept = {t for c in centroids.values() for t in c}
        return cls(
            "centroid", threshold=threshold, margin=margin, centroids=centroids,
            idf={t: round(v, 5) for t, v in idf.items() if t in kept},
            unseen_idf=round(math.log(1 + len(docs)) + 1.0, 5),
        )  # fmt: skip

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, str | os.PathLike], **kwargs: Any) -> Router:
        """A centroid router from each adapter's own training prompts (the sample its run record keeps)."""
        return cls.from_samples({name: training_sample(path) for name, path in adapters.items()}, **kwargs)

    @classmethod
    def from_keywords(
        cls, rules: Mapping[str, Sequence[str]], *, threshold: float = 1, margin: float = 1
    ) -> Router:
        """Explicit rules: the adapter with the most matching keywords (at least `threshold`) wins."""
        clean = {
            name: sorted({w.lower().strip() for w in words if w.strip()}) for name, words in rules.items()
        }
        if not clean or any(not words for words in clean.values()):
            raise UserError("keyword rules need at least one word per adapter, e.g. orders=order,deliver")
        return cls("keywords", threshold=threshold, margin=margin, rules=clean)

    @classmethod
    def from_classifier(
        cls, run_dir: str | os.PathLike, labels: Mapping[str, str | None] | None = None, *,
        threshold: float = 0.5, margin: float = 0.0,
    ) -> Router:  # fmt: skip
        """A trained classifier run; `labels` maps its labels to adapter names (default: the same names)."""
        return cls(
            "classifier",
            threshold=threshold,
            margin=margin,
            classifier=str(run_dir),
            labels=dict(labels or {}),
        )

    def bind_classifier(self, classify: Callable[[str], dict]) -> None:
        """Use `classify(text) -> {"label", "probabilities"}` (e.g. an AdapterSet's) instead of loading the run."""
        self._classify = classify

    # ------------------------------------------------------------------ routing
    def route(self, text: str) -> Route:
        scores = self._scores(text)
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        if not ranked:
            return Route(None, 0.0, "no adapter to route to")
        best, score = ranked[0]
        second, runner = ranked[1] if len(ranked) > 1 else (None, 0.0)
        what = {"centroid": "similarity", "keywords": "keyword matches", "classifier": "probability"}[
            self.kind
        ]
        if score < self.threshold:
            return Route(
                None, score, f"best {best} {what} {score:.3g} is below the threshold {self.threshold:g}"
            )
        if second is not None and score - runner < self.margin:
            return Route(
                None,
                score,
                f"{best} ({score:.3g}) and {second} ({runner:.3g}) are within the margin {self.margin:g}",
            )
        if best in BASE_LABELS:
            return Route(None, score, f"the classifier says base ({what} {score:.3g})")
        ahead = f", next {second} {runner:.3g}" if second is not None else ""
        return Route(best, score, f"{what} {score:.3g} for {best}{ahead}")

    def _scores(self, text: str) -> dict[str, float]:
        if self.kind == "centroid":
            idf, unseen = self.state["idf"], self.state["unseen_idf"]
            # Words no adapter's prompts hold count as the rarest words: they dilute the match, so a request
            # that shares one instruction word ("write") with a domain and nothing else scores low.
            vector = _normalise({t: c * idf.get(t, unseen) for t, c in terms(text).items()})
            return {
                name: sum(w * centroid.get(t, 0.0) for t, w in vector.items())
                for name, centroid in self.state["centroids"].items()
            }
        if self.kind == "keywords":
            found = set(terms(text))
            return {
                name: float(sum(w in found for w in words)) for name, words in self.state["rules"].items()
            }
        result = self._classifier()(text)
        mapping = self.state.get("labels") or {}
        scores: dict[str, float] = {}
        for label, p in result["probabilities"].items():
            target = mapping.get(label, label)
            key = "base" if target is None or target in BASE_LABELS else target
            scores[key] = max(scores.get(key, 0.0), float(p))
        return scores

    def _classifier(self) -> Callable[[str], dict]:
        if self._classify is None:
            from qlora_lite.inference.classification import load_classifier

            classifier = load_classifier(self.state["classifier"])
            self._classify = lambda text: classifier.predict([text])[0]
        return self._classify

    @property
    def adapters(self) -> list[str]:
        if self.kind == "centroid":
            return list(self.state["centroids"])
        if self.kind == "keywords":
            return list(self.state["rules"])
        return sorted({v for v in (self.state.get("labels") or {}).values() if v and v not in BASE_LABELS})

    # ------------------------------------------------------------------ evaluation and files
    def evaluate(self, held_out: Sequence[tuple[str, str | None]] | Sequence[Mapping]) -> dict[str, Any]:
        """Routing accuracy and confusion matrix on (text, expected adapter or None) pairs / {"text","adapter"}."""
        pairs = [(r["text"], r.get("adapter")) if isinstance(r, Mapping) else (r[0], r[1]) for r in held_out]
        if not pairs:
            raise UserError("no held-out examples to evaluate the router on")
        confusion: dict[str, dict[str, int]] = {}
        correct = fallbacks = 0
        for text, expected in pairs:
            got = self.route(text).adapter
            want = "base" if expected in (None, *BASE_LABELS) else str(expected)
            name = got or "base"
            confusion.setdefault(want, {}).setdefault(name, 0)
            confusion[want][name] += 1
            correct += name == want
            fallbacks += got is None
        return {
            "n": len(pairs),
            "accuracy": correct / len(pairs),
            "fallbacks": fallbacks,
            "confusion": confusion,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "qlora_lite_router": FORMAT, "kind": self.kind, "threshold": self.threshold, "margin": self.margin,
            **self.state,
        }  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Router:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"router file {path} not found: build one with `qlora-lite route build`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from None
        if not isinstance(data, dict) or data.pop("qlora_lite_router", None) != FORMAT:
            raise UserError(f"{path} is not a router file written by qlora-lite (format {FORMAT})")
        kind, threshold, margin = data.pop("kind"), data.pop("threshold"), data.pop("margin")
        return cls(kind, threshold=threshold, margin=margin, **data)


def training_sample(run_dir: str | os.PathLike) -> list[str]:
    """The training prompts a run kept for routing; older runs: read again from their data file if it is here."""
    from qlora_lite.model.loading import read_run_record

    record = read_run_record(run_dir)
    if record is None:
        raise UserError(f"{run_dir} holds no run record: build the router from samples or keywords instead")
    if record.get("router_sample"):
        return list(record["router_sample"])
    data = record.get("data", {})
    source = data.get("source")
    if source and Path(source).is_file():
        from qlora_lite.data.formats import detect_format, load_records, to_conversations

        records = load_records(source)
        spec = detect_format(records, format=data.get("format"), columns=data.get("columns"))
        return prompt_sample(to_conversations(records, spec))
    raise UserError(
        f"{run_dir}: its run record keeps no router sample and its data {source!r} is not here; "
        "build the router from samples (Router.from_samples) or keywords"
    )
