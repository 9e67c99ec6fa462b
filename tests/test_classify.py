"""Classification on tiny in-process models: decoder (Llama, 4-bit) and encoder (BERT, 32-bit and 4-bit).

What is proved: training changes LoRA + head only; the folder (adapter + head via modules_to_save) loads with
plain PEFT and gives the same probabilities as qlora_lite.classify; label mappings, metrics and the
confusion matrix land in the run record; bad input fails before anything is written; a resumed run refuses
another label mapping; the step loss does not depend on the micro-batch split, and OOM backoff keeps it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lite.cli import classify as classify_cli
from qlora_lite.data.labels import ClassifierExample, LabelMapping, stratified_split
from qlora_lite.errors import UserError
from qlora_lite.inference.classification import classify, load_classifier
from qlora_lite.training.api import train_classifier
from qlora_lite.training.loop import LoopState, StepRunner
from qlora_lite.training.task_classifier import ClassificationObjective

WORDS = {"pos": ["love", "enjoy", "adore"], "neg": ["hate", "dislike", "loathe"], "neutral": ["saw", "met"]}
ROWS = [
    {"text": f"I {w} the thing number {i}", "label": label}
    for i in range(6)
    for label, words in WORDS.items()
    for w in words
]
FAST = dict(
    max_steps=4,
    effective_batch_size=8,
    micro_batch_size=4,
    lora_r=4,
    progress=False,
    learning_rate=5e-3,
    seed=3,
)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def build_tiny_bert(folder: Path) -> Path:
    """A randomly initialised 2-layer BERT and a WordPiece tokenizer trained in-process."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        [r["text"] for r in ROWS] * 2, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    _quiet()
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def plain_peft_probabilities(base: str, run_dir: Path, texts: list[str], quantization: str) -> torch.Tensor:
    """What a user without qlora_lite does: plain transformers + PEFT, the label keywords from labels.json."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    kwargs = json.loads((run_dir / "labels.json").read_text())
    kwargs.pop("names")
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["score", "classifier"],
        )  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, **kwargs)
    from qlora_lite.compat import keep_4bit_weights_differentiable

    keep_4bit_weights_differentiable(model)  # the kernel qlora_lite runs on every CPU (qlora_lite.compat)
    model = PeftModel.from_pretrained(model, str(run_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    with torch.no_grad():
        return torch.cat([model(**tokenizer([t], return_tensors="pt")).logits.softmax(-1) for t in texts])


class Snapshot:
    def on_model_ready(self, model) -> None:
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "which,quantization",
    [("llama", "nf4"), ("bert", "none"), ("bert", "nf4")],
)
def test_train_save_and_reload_with_plain_peft(tiny_models, tiny_bert, tmp_path, which, quantization):
    base = tiny_models["llama"] if which == "llama" else tiny_bert
    snap = Snapshot()
    out = tmp_path / "run"
    result = train_classifier(
        base, ROWS, str(out), quantization=quantization, eval_fraction=0.25, callbacks=[snap], **FAST
    )

    # Only LoRA matrices and the head copy train; the head is what modules_to_save keeps.
    changed = {n for n, p in snap.model.named_parameters() if not torch.equal(p, snap.before[n])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    assert any("modules_to_save" in n for n in changed)
    saved = load_file(out / "adapter_model.safetensors")
    head = "score" if which == "llama" else "classifier"
    assert f"base_model.model.{head}.weight" in saved

    # Label mapping in labels.json and the run record; metrics, distribution, confusion matrix.
    labels = json.loads((out / "labels.json").read_text())
    assert labels["names"] == ["neg", "neutral", "pos"] and labels["label2id"] == {
        "neg": 0,
        "neutral": 1,
        "pos": 2,
    }
    record = json.loads((out / "run_record.json").read_text())
    assert record["task"] == "classification" and record["labels"]["id2label"] == {
        "0": "neg",
        "1": "neutral",
        "2": "pos",
    }
    assert record["quantization"]["method"] == quantization
    assert record["plan"]["task"] == "classification"
    assert record["label_distribution"]["train"] == {"neg": 14, "neutral": 9, "pos": 14}
    assert sum(record["label_distribution"]["eval"].values()) == 11
    evaluation = record["evaluation"]
    assert 0 <= evaluation["accuracy"] <= 1 and set(evaluation["per_class"]) == {"neg", "neutral", "pos"}
    assert sum(map(sum, evaluation["confusion_matrix"])) == evaluation["examples"] == 11
    assert record["metrics"]["eval_accuracy"] == evaluation["accuracy"]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.confusion_matrix == out / "confusion_matrix.png"

    # qlora_lite.classify and plain PEFT agree.
    texts = ["I love the thing number 3", "I hate it", "I saw the thing"]
    ours = classify(out, texts)
    assert [set(p["probabilities"]) for p in ours] == [{"neg", "neutral", "pos"}] * 3
    ours_probs = torch.tensor([[p["probabilities"][n] for n in ("neg", "neutral", "pos")] for p in ours])
    plain = plain_peft_probabilities(base, out, texts, quantization)
    assert torch.allclose(ours_probs, plain, atol=1e-4), (ours_probs, plain)
    assert [p["label"] for p in ours] == [labels["id2label"][str(int(i))] for i in plain.argmax(-1)]

    # Re-running the same call returns the finished run without training again.
    again = train_classifier(base, ROWS, str(out), quantization=quantization, eval_fraction=0.25, **FAST)
    assert again.metrics == result.metrics and again.labels == ("neg", "neutral", "pos")


def test_integer_labels_from_csv_and_cli(tiny_models, tmp_path, capsys):
    _quiet()
    data = tmp_path / "data.csv"
    lines = ["sentence,category"] + [
        f"{r['text']},{['neg', 'neutral', 'pos'].index(r['label']) * 5}" for r in ROWS
    ]
    data.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    classify_cli.add_classify_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train-classifier", "--model", tiny_models["llama"], "--data", str(data), "--output", str(tmp_path / "run"),
         "--max-steps", "2", "--effective-batch-size", "8", "--lora-r", "4", "--no-progress",
         "--class-weights", "balanced"]
    )  # fmt: skip
    assert classify_cli.run_train_classifier(args) == 0
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert record["labels"]["names"] == ["0", "5", "10"]  # numeric order, not text order
    assert record["data"]["columns"] == {"text": "sentence", "label": "category"}
    assert len(record["class_weights"]) == 3 and record["class_weights"][1] > record["class_weights"][0]
    capsys.readouterr()

    args = parser.parse_args(["classify", str(tmp_path / "run"), "I love it", "I hate it"])
    assert classify_cli.run_classify(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["label", "prob", "text"] and len(table) == 3

    out_file = tmp_path / "pred" / "out.jsonl"
    args = parser.parse_args(
        ["classify", str(tmp_path / "run"), "--input", str(data), "--output", str(out_file)]
    )
    assert classify_cli.run_classify(args) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == len(ROWS) and {"sentence", "category", "predicted_label", "probabilities"} <= set(
        rows[0]
    )
    assert "accuracy" in capsys.readouterr().out  # the file had the run's label column: a table is printed

    with pytest.raises(UserError, match="not both"):
        classify_cli.run_classify(
            parser.parse_args(["classify", str(tmp_path / "run"), "x", "--input", str(data)])
        )
    with pytest.raises(UserError, match="empty"):
        load_classifier(tmp_path / "run").predict(["fine", "  "])


def _interrupt_at(step: int):
    class Interrupt:
        def on_step_end(self, state) -> None:
            if state.step == step:
                raise KeyboardInterrupt

    return Interrupt()


def test_resume_refuses_another_label_mapping_and_loses_nothing(tiny_models, tmp_path):
    base, out = tiny_models["llama"], tmp_path / "run"
    settings = dict(FAST, max_steps=4, eval_fraction=0.0)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(base, ROWS, str(out), callbacks=[_interrupt_at(2)], **settings)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000002"]

    with pytest.raises(UserError, match=r"trained with labels \['neg', 'neutral', 'pos'\]"):
        train_classifier(base, ROWS, str(out), labels=["pos", "neg", "neutral"], resume="force", **settings)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints

    result = train_classifier(base, ROWS, str(out), **settings)
    assert result.resumed_from_step == 2 and result.metrics["steps"] == 4
    adapter = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="trained with labels"):
        train_classifier(base, ROWS, str(out), labels=["pos", "neg", "neutral"], **settings)
    assert (out / "adapter_model.safetensors").read_bytes() == adapter


@pytest.mark.parametrize(
    "rows,kwargs,match",
    [
        ([{"text": f"t {i}", "label": "a"} for i in range(8)], {}, "single class"),
        ([*ROWS[:5], {"text": "  ", "label": "pos"}], {}, "record 6: field 'text' is missing or empty"),
        ([*ROWS[:5], {"text": "fine", "label": ""}], {}, "record 6: field 'label' is missing or empty"),
        (ROWS, {"eval_data": [{"text": "x", "label": "pos"}, {"text": "y", "label": "angry"}]}, "'angry'"),
        (ROWS, {"class_weights": {"happy": 2.0}}, "class_weights names 'happy'"),
        (ROWS, {"class_weights": "heavy"}, "class_weights='heavy'"),
        (ROWS, {"labels": ["neg", "pos"]}, "'neutral' is not in labels="),
        (ROWS, {"labels": ["neg", "pos", "neutral", "other"]}, r"\['other'\] have no training examples"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tiny_models, tmp_path, rows, kwargs, match):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=match):
        train_classifier(tiny_models["llama"], rows, str(out), **kwargs, **FAST)
    assert not out.exists()


def test_stratified_split_keeps_every_class_in_training():
    pairs = [(f"t{i}", "big") for i in range(40)] + [("r1", "rare"), ("r2", "rare"), ("s", "single")]
    train, held = stratified_split(pairs, 0.25, seed=0)
    assert {y for _, y in train} == {"big", "rare", "single"}
    assert sum(1 for _, y in held if y == "big") == 10 and sum(1 for _, y in held if y == "rare") == 0
    assert stratified_split(pairs, 0.25, seed=0) == (train, held)
    assert LabelMapping.build([2, 10, 1.0]).names == (1, 2, 10)


class TinyClassifier(torch.nn.Module):
    """Embedding-bag classifier with the HF output shape; raises OOM for micro-batches above `oom_above`."""

    def __init__(self, oom_above: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 3)
        self.oom_above = oom_above
        self.config = type("C", (), {"num_labels": 3})()

    def forward(self, input_ids, attention_mask):
        if self.oom_above is not None and input_ids.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return type("Out", (), {"logits": self.head(pooled)})()


def _grads(micro_batch_size: int, weights):
    """Loss and gradients of one 8-example step split into micro-batches of `micro_batch_size`."""
    model = TinyClassifier()
    examples = [ClassifierExample(list(range(1, 2 + i % 5)), i % 3) for i in range(8)]
    runner = StepRunner(
        model, torch.optim.SGD(model.parameters(), lr=0.1), None, examples, pad_token_id=0, device="cpu",
        max_grad_norm=None, objective=ClassificationObjective(torch.tensor(weights) if weights else None),
    )  # fmt: skip
    loss = runner._forward_backward(list(range(8)), micro_batch_size)  # the step's own denominator
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
def test_step_loss_is_independent_of_the_micro_batch_split_and_survives_oom(weights):
    loss_full, grads_full = _grads(8, weights)
    loss_split, grads_split = _grads(2, weights)
    assert loss_full == pytest.approx(loss_split, rel=1e-5)
    for a, b in zip(grads_full, grads_split, strict=True):
        assert torch.allclose(a, b, atol=1e-6)

    model = TinyClassifier(oom_above=2)
    examples = [ClassifierExample(list(range(1, 2 + i % 5)), i % 3) for i in range(8)]
    runner = StepRunner(
        model, torch.optim.SGD(model.parameters(), lr=0.1), None, examples, pad_token_id=0, device="cpu",
        max_grad_norm=None, objective=ClassificationObjective(torch.tensor(weights) if weights else None),
    )  # fmt: skip
    state = LoopState(micro_batch_size=8)
    loss = runner.run(list(range(8)), state, apply=False)
    assert state.micro_batch_size == 2 and state.oom_backoffs == 2
    assert loss == pytest.approx(loss_full, rel=1e-5)
    # The weighted loss is the weighted mean cross-entropy of the whole step.
    full = TinyClassifier()
    ids = examples
    width = max(len(e.input_ids) for e in ids)
    x = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in ids])
    logits = full(x, (x != 0).long()).logits
    expected = torch.nn.functional.cross_entropy(
        logits, torch.tensor([e.label for e in ids]), weight=torch.tensor(weights) if weights else None
    )
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)


def test_demo_dataset_holds_out_unseen_phrasings():
    from qlora_lite.demo.classify import HELD_OUT_TEMPLATES, INTENTS, make_intent_dataset

    train, held = make_intent_dataset()
    assert make_intent_dataset() == (train, held)  # seeded
    assert {r["label"] for r in train} == {r["label"] for r in held} == set(INTENTS)
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    # The first word pair of every held-out phrasing never starts a training text of that intent.
    for label, templates in INTENTS.items():
        for template in templates[-HELD_OUT_TEMPLATES:]:
            stem = template.split("{")[0].strip().lower()
            if stem:
                assert not any(r["text"].lower().startswith(stem) for r in train if r["label"] == label)


@pytest.mark.slow
def test_classify_demo_beats_the_majority_baseline(tmp_path):
    """MiniLM on the intent demo: ~20 s training on one CPU thread."""
    from qlora_lite.demo.classify import minilm_path, run_classify_demo

    try:
        minilm_path()
    except UserError as exc:
        pytest.skip(str(exc))
    summary = run_classify_demo(str(tmp_path / "demo"), progress=False)
    assert summary["accuracy_after"] >= summary["majority_baseline_accuracy"] + 0.5
    assert summary["accuracy_after_reloaded"] == pytest.approx(summary["accuracy_after"], abs=0.02)


def test_prefix_tuning_on_an_encoder_is_refused_before_any_step(tiny_bert, tmp_path):
    # PEFT itself fails at the first forward with a ValueError; the run folder must stay empty of checkpoints.
    with pytest.raises(
        UserError, match="prefix tuning of a classifier needs a model that takes past_key_values; bert"
    ):
        train_classifier(tiny_bert, ROWS, str(tmp_path / "run"), peft_method="prefix_tuning", **FAST)
    assert not (tmp_path / "run" / "checkpoints").exists()
