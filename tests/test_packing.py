"""Packing without attention across examples, and the chunked loss on supervised positions, on tiny models."""

from __future__ import annotations

import random

import pytest
import torch

from qlora_lite.data.encoding import Example
from qlora_lite.model.loading import attach_lora, load_base_model
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.training.batching import collate_rows, pack_rows, row_groups
from qlora_lite.training.fastpath import choose_fast_paths
from qlora_lite.training.loss import LossPath, linear_cross_entropy


def _examples(vocab: int, lengths: list[int], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        cut = n // 3  # a "prompt" without loss, then the "answer"
        out.append(Example(ids, [-100] * cut + ids[cut:]))
    return out


def _model(path: str, quantization: str = "nf4", attn: str = "sdpa", dropout: float = 0.0):
    base = load_base_model(path, quantization=quantization, compute_dtype="fp32", attn_implementation=attn)
    model = attach_lora(base, PeftSettings(r=4, dropout=dropout), gradient_checkpointing=False)
    torch.manual_seed(1)
    for name, param in model.named_parameters():  # non-zero B: the adapter takes part in the check
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _per_example_losses(model, batch, rows, packed: bool) -> list[float]:
    """Summed token loss of each example, read from the logits of a (packed or padded) micro-batch."""
    logits = model(**batch.inputs).logits.float()
    out = []
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            lp = logits[r, start : start + n - 1].log_softmax(-1)
            labels = torch.tensor(example.labels[1:])
            keep = labels != -100
            out.append(float(-lp[keep].gather(1, labels[keep][:, None]).sum()))
            start += n if packed else 0
    return out


def test_best_fit_decreasing_packs_within_capacity_and_is_deterministic():
    examples = _examples(50, [30, 5, 12, 40, 3, 20, 8, 25])
    rows = pack_rows(range(8), examples, capacity=48)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(len(examples[i].input_ids) for i in row) <= 48 for row in rows)
    assert len(rows) == 3  # 143 tokens in rows of 48: the fewest possible
    assert rows == pack_rows(list(reversed(range(8))), examples, capacity=48)
    # Micro-batches of rows never depend on the micro-batch size except through grouping.
    assert [r for g in row_groups(range(8), examples, 1, 48) for r in g] == [
        r for g in row_groups(range(8), examples, 3, 48) for r in g
    ]


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager")])
def test_packed_loss_per_example_equals_unpacked(tiny_models, arch, attn):
    """No token attends to another example: each example's loss inside a packed row equals its loss alone."""
    model = _model(tiny_models[arch], attn=attn).eval()
    vocab = model.config.vocab_size
    examples = _examples(vocab, [17, 9, 23, 5, 11])
    packed_rows = [[examples[0], examples[1], examples[2]], [examples[3], examples[4]]]
    with torch.no_grad():
        packed = collate_rows(packed_rows, 0, "cpu", packed=True)
        # The padding after the shorter row restarts its positions: a block of its own.
        assert packed.inputs["position_ids"][1].tolist()[16:] == list(range(49 - 16))
        together = _per_example_losses(model, packed, packed_rows, packed=True)
        alone = []
        for example in examples:
            batch = collate_rows([[example]], 0, "cpu", packed=False)
            alone += _per_example_losses(model, batch, [[example]], packed=False)
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-4, atol=1e-4)
    # The check itself can fail: without restarting positions, the second example sees the first.
    with torch.no_grad():
        flat = torch.tensor([examples[0].input_ids + examples[1].input_ids])
        crossed = model(input_ids=flat).logits[0, 17:].float()
        single = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0].float()
    assert (crossed - single).abs().max() > 1e-3


def test_chunked_loss_equals_model_loss_and_gradients(tiny_models):
    model = _model(tiny_models["llama"], quantization="none")
    model.train()
    examples = _examples(model.config.vocab_size, [17, 9, 23, 5])
    batch = collate_rows([[e] for e in examples], 0, "cpu", packed=False)
    denominator = 50

    def grads(path):
        model.zero_grad(set_to_none=True)
        loss = path(model, batch, denominator)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_a, grads_a = grads(LossPath(chunked=False))
    loss_b, grads_b = grads(LossPath(chunked=True))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_chunks_match_one_pass():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    a = linear_cross_entropy(hidden, weight, None, targets, 40, chunk=8)
    (ga,) = torch.autograd.grad(a * 3, hidden)
    b = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum") / 40
    (gb,) = torch.autograd.grad(b * 3, hidden)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_fast_paths_are_chosen_after_checking_the_model(tiny_models):
    model = _model(tiny_models["llama"])
    examples = _examples(model.config.vocab_size, [30, 20, 10])
    paths = choose_fast_paths(model, examples, 0, "cpu", None, packing=True, chunked_loss=True, capacity=64)
    assert paths.packing and paths.pack_capacity == 64 and paths.loss.chunked and not paths.notes
    assert model.training


@pytest.mark.parametrize("fast", [True, False], ids=["planned-on", "turned-off"])
def test_the_run_record_says_which_fast_paths_the_steps_used(tiny_model, tmp_path, fast):
    import json

    import qlora_lite

    rows = [{"instruction": f"Say {i}", "output": f"It is {i}, yes indeed."} for i in range(8)]
    result = qlora_lite.train(
        tiny_model, rows, tmp_path / "run", max_steps=1, effective_batch_size=4, micro_batch_size=4, lora_r=4,
        progress=False, eval_fraction=0.0, packing=fast, chunked_loss=fast,
    )  # fmt: skip
    used = json.loads(result.run_record.read_text())["fast_paths"]
    assert (used["packing"], used["chunked_loss"], used["notes"]) == (fast, fast, [])
