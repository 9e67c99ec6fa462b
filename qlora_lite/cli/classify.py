"""`qlora-lite classify` and `qlora-lite train-classifier`: label texts with a run, train a classifier."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qlora_lite.cli.flags import add_option_flags, settings_from_args
from qlora_lite.errors import UserError
from qlora_lite.options import CLASSIFY

TEXT_COLUMNS = ("text", "sentence", "content")


def class_weights_arg(value: str) -> str | dict[str, float]:
    """`balanced` or `label=weight,...` -> "balanced" or {label: weight}."""
    if value == "balanced":
        return value
    weights = {}
    for pair in value.split(","):
        label, sep, weight = pair.partition("=")
        try:
            weights[label.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not label.strip():
            raise argparse.ArgumentTypeError(
                f"--class-weights wants 'balanced' or LABEL=WEIGHT pairs like spam=3, got {pair!r}"
            )
    return weights


def add_classify_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `classify` (predict) and `train-classifier` (train) to the CLI's subcommands."""
    c = sub.add_parser("classify", help="label texts with a trained classifier run")
    c.add_argument("run_dir", help="run folder written by train-classifier, or the Hub id it was pushed to")
    c.add_argument("texts", nargs="*", help="texts to classify (or use --input)")
    c.add_argument("--input", help="JSONL/JSON/CSV/Parquet file of texts to classify")
    c.add_argument("--output", help="JSONL file to write (file mode; default: print JSON lines)")
    c.add_argument("--text-column", help="column holding the text (default: text/sentence/content)")
    c.add_argument("--label-column", help="column holding true labels: report accuracy (default: the run's)")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--model", help="base model folder (default: the one in the run record)")
    c.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    t = sub.add_parser("train-classifier", help="train LoRA + a classification head on labelled texts")
    t.add_argument("--model", help="model folder or Hub id (decoder or encoder)")
    t.add_argument("--data", help="JSONL, JSON, CSV or Parquet file with text + label, or a Hub data set")
    t.add_argument("--output", help="run folder to write")
    t.add_argument("--eval-data", help="held-out file (default: a stratified --eval-fraction split)")
    t.add_argument("--text-column", help="default: text/sentence/content")
    t.add_argument("--label-column", help="default: label/labels/category/intent/class")
    t.add_argument("--labels", help="comma-separated label order (ids); default: sorted")
    t.add_argument("--class-weights", type=class_weights_arg, metavar="balanced|LABEL=W,...")
    t.add_argument("--no-progress", action="store_true")
    add_option_flags(t, CLASSIFY)


add_parsers = add_classify_parsers


def _text_column(records: list[dict], wanted: str | None, path: str) -> str:
    columns = list(dict.fromkeys(k for r in records[:32] for k in r))
    if wanted:
        if wanted not in columns:
            raise UserError(f"{path}: no column {wanted!r}; columns: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for name in TEXT_COLUMNS:
        if name in lower:
            return lower[name]
    raise UserError(f"{path}: no text column among {', '.join(columns)}; name it with --text-column")


def _file_mode(args: argparse.Namespace, classifier, record: dict) -> int:
    from qlora_lite.data.formats import load_records
    from qlora_lite.training.evaluation import classification_metrics, format_classification_table

    records = load_records(args.input)
    column = _text_column(records, args.text_column, args.input)
    texts = []
    for i, row in enumerate(records, start=1):
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            raise UserError(
                f"{args.input} record {i}: field {column!r} is missing or empty; fill it in or remove it"
            )
        texts.append(text)
    predictions = classifier.predict(texts, batch_size=args.batch_size)
    rows = [
        {**row, "predicted_label": p["label"], "probabilities": p["probabilities"]}
        for row, p in zip(records, predictions, strict=True)
    ]
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(lines, encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {len(rows)} predictions to {out}")
    else:
        print(lines, end="")
    label_col = args.label_column or record.get("data", {}).get("columns", {}).get("label")
    if label_col and all(label_col in r for r in records):
        names = [str(n) for n in classifier.labels]
        ids = {n: i for i, n in enumerate(names)}
        truth = [str(r[label_col]).strip() for r in records]
        unknown = sorted({t for t in truth if t not in ids})
        if unknown:
            print(f"accuracy not computed: labels {unknown} are not among the run's labels {names}")
        else:
            predicted = [ids[str(p["label"])] for p in predictions]
            metrics = classification_metrics([ids[t] for t in truth], predicted, names)
            print(format_classification_table(metrics))
    return 0


def run_classify(args: argparse.Namespace) -> int:
    """`qlora-lite classify RUN_DIR "text" ...` or `--input FILE [--output OUT.jsonl]`."""
    from qlora_lite.inference.classification import load_classifier
    from qlora_lite.model.loading import read_run_record

    if bool(args.texts) == bool(args.input):
        raise UserError(
            'give texts to classify (qlora-lite classify RUN_DIR "text" ...) or --input FILE, not both'
        )
    if args.output and not args.input:
        raise UserError(
            "--output needs --input FILE (file mode); texts given on the command line are printed"
        )
    classifier = load_classifier(args.run_dir, model=args.model)
    if args.input:
        return _file_mode(args, classifier, read_run_record(args.run_dir) or {})
    predictions = classifier.predict(args.texts, batch_size=args.batch_size)
    if args.json:
        for text, p in zip(args.texts, predictions, strict=True):
            print(json.dumps({"text": text, **p}, ensure_ascii=False, default=str))
        return 0
    width = max(len("label"), *(len(str(p["label"])) for p in predictions))
    print(f"{'label':<{width}}  {'prob':>5}  text")
    for text, p in zip(args.texts, predictions, strict=True):
        prob = p["probabilities"][p["label"]]
        print(f"{str(p['label']):<{width}}  {prob:5.3f}  {text}")
    return 0


def run_train_classifier(args: argparse.Namespace) -> int:
    """`qlora-lite train-classifier --model M --data D --output O [...]`: prints the metrics as JSON."""
    from qlora_lite.training.api import train_classifier

    overrides = settings_from_args(args, CLASSIFY)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    result = train_classifier(
        args.model, args.data, args.output, text_column=args.text_column, label_column=args.label_column,
        labels=labels, class_weights=args.class_weights, eval_data=args.eval_data,
        progress=not args.no_progress, **overrides,
    )  # fmt: skip
    if result.evaluation:
        from qlora_lite.training.evaluation import format_classification_table

        print(format_classification_table(result.evaluation))
    summary = {
        "output_dir": str(result.output_dir),
        "resumed_from_step": result.resumed_from_step,
        **result.metrics,
    }
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS = {"classify": run_classify, "train-classifier": run_train_classifier}
