"""LoftQ with more than one iteration: it rewrites the 4-bit base, so the run keeps that base beside the adapter.

What could go wrong and is checked: the iterations not fitting better than one, the base not saved or not
the one trained on, a resume on a fresh machine training on a recomputed or original base, a loader putting
the adapter on the original base, the push leaving the base behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_peft_methods import BASE, ROWS, _frozen, _losses, _plain_peft_logits, _worker

import qlora_lite
from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings

LOFTQ3 = {**BASE, "init_lora_weights": "loftq", "loftq_iter": 3}
IDS = torch.tensor([[5, 17, 29, 41, 53, 65, 77, 89], [6, 18, 30, 42, 54, 66, 78, 90]])
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


@pytest.fixture(scope="module")
def loftq_run(tiny_model, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loftq-run")
    qlora_lite.train(tiny_model, data_file, out, **{**LOFTQ3, "max_steps": 3})
    return out


def _fit_error(tiny_model: str, iterations: int) -> tuple[float, torch.Tensor]:
    """||W - deq(Q) - s*B@A|| of one layer after LoftQ's init, and the layer's packed 4-bit bytes."""
    import bitsandbytes.functional as bnbf

    from qlora_lite.model.loading import attach_lora, load_base_model

    settings = PeftSettings(r=4, init="loftq", loftq_iter=iterations, target_modules=("q_proj",))
    model = attach_lora(
        load_base_model(tiny_model), settings, gradient_checkpointing=False, model_path=tiny_model
    )
    module = dict(model.named_modules())["base_model.model." + Q_PROJ]
    base = module.get_base_layer()
    a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
    w = load_file(Path(tiny_model) / "model.safetensors")[Q_PROJ + ".weight"].float()
    deq = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    with torch.no_grad():
        return float(torch.linalg.norm(w - deq - s * b @ a)), base.weight.data.clone()


def test_more_iterations_rewrite_the_base_and_fit_the_weights_better(tiny_model):
    one, bytes_one = _fit_error(tiny_model, 1)
    three, bytes_three = _fit_error(tiny_model, 3)
    plain = qlora_lite.model.loading.load_base_model(tiny_model).model.layers[0].self_attn.q_proj.weight.data
    assert torch.equal(bytes_one, plain)  # one iteration keeps the base as loaded
    assert not torch.equal(bytes_three, plain)  # Q(W - s*B@A) from the second round on
    assert three < one  # the alternation lowers what base + adapter miss of W (LoftQ's point)


def test_the_run_saves_the_base_it_trained_on_and_plain_peft_loads_onto_it(loftq_run, tiny_model):
    record = json.loads((loftq_run / "run_record.json").read_text())
    own = record["loftq_base"]
    folder = loftq_run / own["folder"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metadata"]["loftq_iter"] == 3 and "model.safetensors" in manifest["files"]
    assert own["sha256"] == qlora_lite.model.loftq_base.weights_sha256(manifest)
    # plain transformers + PEFT on the saved base reproduce what qlora_lite loads; the original base does not
    saved = _plain_peft_logits(str(folder), loftq_run, quantized=False)
    original = _plain_peft_logits(tiny_model, loftq_run)
    assert (saved - original).abs().max() > 1e-3
    from qlora_lite.model.loading import load_for_inference

    model, _ = load_for_inference(loftq_run)
    with torch.no_grad():
        ours = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    torch.testing.assert_close(ours, saved, rtol=0, atol=1e-5)
    # the plan says what the iterations cost before anything is loaded
    explained = qlora_lite.plan(
        tiny_model, hardware="t4", peft=PeftSettings(init="loftq", loftq_iter=3)
    ).explain()
    assert "3 iterations re-quantize the base" in explained and "loftq_base/" in explained


def test_an_adapter_set_takes_the_saved_base_and_refuses_the_original(loftq_run, tiny_model):
    from qlora_lite.inference.portability import adapter_report

    with pytest.raises(UserError, match=r"its own 4-bit base .* \(LoftQ rewrote it\)"):
        qlora_lite.AdapterSet(tiny_model, {"loftq": str(loftq_run)})
    adapters = qlora_lite.AdapterSet(adapters={"loftq": str(loftq_run)})
    assert adapters.base_id == str(loftq_run / "loftq_base")
    model, _ = qlora_lite.model.loading.load_for_inference(loftq_run)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    torch.testing.assert_close(adapters.logits(IDS, "loftq"), want, rtol=0, atol=1e-6)
    report = adapter_report(loftq_run)
    assert report["own_base"] == str(loftq_run / "loftq_base")
    assert not report["llama_cpp"]["ok"] and "merge" in " ".join(report["llama_cpp"]["reasons"])
    assert report["vllm"]["ok"] and any("loftq_base" in n for n in report["vllm"]["notes"])


def test_merge_uses_the_saved_base(loftq_run, tmp_path):
    result = qlora_lite.merge_adapter(loftq_run, tmp_path / "merged", dtype="fp32")
    assert result.report["base"] == str(loftq_run / "loftq_base")
    assert result.report["max_abs_logit_diff_unmerged_same_weights"] < 1e-4
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    # the saved base + adapter as trained (the original base would be ~5e-2 away)
    want = _plain_peft_logits(str(loftq_run / "loftq_base"), loftq_run, quantized=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_a_resume_on_a_fresh_machine_takes_the_base_from_the_durable_place(tiny_model, data_file, tmp_path):
    durable = tmp_path / "drive"
    settings = {**LOFTQ3, "save_every_steps": 2, "checkpoint_dir": str(durable)}
    ref = _worker(
        tiny_model, data_file, tmp_path / "ref", {**settings, "checkpoint_dir": str(tmp_path / "d0")}
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    # forward 8 = step 4's first micro-batch (forward 1 is the probe): the checkpoint of step 2 resumes
    killed = _worker(tiny_model, data_file, out, settings, kill_at_forward=8)
    assert killed.returncode == -9, killed.stderr[-2000:]
    [copied] = [p for p in durable.iterdir() if p.name.startswith("loftq-base-")]
    assert (copied / "model.safetensors").read_bytes() == (
        out / "loftq_base" / "model.safetensors"
    ).read_bytes()
    shutil.rmtree(out)  # a fresh machine: only the durable place is left
    resumed = _worker(tiny_model, data_file, out, settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] == 2
    got, want = _losses(out / "steps.jsonl"), _losses(tmp_path / "ref" / "steps.jsonl")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6] and [v for _, v in got] == [v for _, v in want]
    # without the base anywhere, the resume refuses instead of training on another base
    shutil.rmtree(out)
    shutil.rmtree(copied)
    refused = _worker(tiny_model, data_file, out, settings)
    assert refused.returncode != 0 and "no intact copy" in refused.stderr, refused.stderr[-2000:]


def test_the_push_carries_the_base_and_a_hub_id_loads_onto_it(
    loftq_run, tiny_model, hub_server, monkeypatch, tmp_path
):
    monkeypatch.setenv("HF_TOKEN", "tok-user")
    result = qlora_lite.push(loftq_run, "user/loftq-adapter")
    files = hub_server.files("user/loftq-adapter")
    assert files["loftq_base/model.safetensors"] == (loftq_run / "loftq_base/model.safetensors").read_bytes()
    assert "loftq_base/manifest.json" in result.files
    made_from = json.loads(files["loftq_base/manifest.json"])["metadata"]["made_from"]
    assert made_from["path"] == Path(tiny_model).name  # no local folder of the training machine in public
    assert 'subfolder="loftq_base"' in files["README.md"].decode()
    from qlora_lite.model.loading import load_for_inference

    local, _ = load_for_inference(loftq_run)
    pulled, _ = load_for_inference("user/loftq-adapter")
    # the base's files go up from disk (never whole in memory), and are still searched for the token
    leaky = tmp_path / "leaky"
    shutil.copytree(loftq_run, leaky)
    weights = leaky / "loftq_base" / "model.safetensors"
    pad = (1 << 24) - 3 - weights.stat().st_size  # the token straddles the first 16 MiB piece's end
    with open(weights, "ab") as handle:
        handle.write(b"x" * pad + b"tok-user")
    with pytest.raises(UserError, match="loftq_base/model.safetensors contains your Hugging Face token"):
        qlora_lite.push(leaky, "user/leaky")
    with torch.no_grad():
        torch.testing.assert_close(pulled(input_ids=IDS).logits, local(input_ids=IDS).logits, rtol=0, atol=0)


def test_the_frozen_base_stays_the_saved_one_during_training(tiny_model, data_file, tmp_path):
    class Snapshot:
        def on_model_ready(self, model) -> None:
            self.model = model
            self.frozen = {n: t.detach().clone() for n, t in _frozen(model).items()}

    snap = Snapshot()
    qlora_lite.train(tiny_model, data_file, tmp_path, callbacks=[snap], **{**LOFTQ3, "max_steps": 2})
    saved = load_file(tmp_path / "loftq_base" / "model.safetensors")
    for key, tensor in _frozen(snap.model).items():
        assert torch.equal(tensor, snap.frozen[key]), key
    weight = f"base_model.model.{Q_PROJ}.base_layer.weight"
    assert torch.equal(snap.frozen[weight].view(-1), saved[Q_PROJ + ".weight"].view(-1))


def test_a_classifier_run_keeps_its_base_and_loads_onto_it(tiny_models, tmp_path):
    from test_classify import FAST
    from test_classify import ROWS as LABELLED

    from qlora_lite.inference.classification import load_classifier

    out = tmp_path / "clf"
    qlora_lite.train_classifier(
        tiny_models["llama"], LABELLED, str(out), init_lora_weights="loftq", loftq_iter=3, **FAST
    )
    saved = load_file(out / "loftq_base" / "model.safetensors")
    classifier = load_classifier(out)  # no forward yet: the 4-bit bytes are as loaded
    layer = classifier.model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert torch.equal(layer.weight.data.view(-1), saved[Q_PROJ + ".weight"].view(-1))
    original = load_classifier(out, model=tiny_models["llama"])  # forcing the original base: other bytes
    layer = original.model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert not torch.equal(layer.weight.data.view(-1), saved[Q_PROJ + ".weight"].view(-1))


def test_checkpoints_on_the_hub_carry_the_base_to_a_fresh_machine(
    tiny_model, data_file, tmp_path, monkeypatch
):
    from fake_hub import FakeHub, FakeHubClient

    from qlora_lite.hub import client as hub_client

    hub = FakeHub(tmp_path / "hub", {"hf_tok": {"name": "alice", "orgs": [], "role": "write"}})
    monkeypatch.setattr(hub_client, "make_client", lambda token: FakeHubClient(hub, token))
    monkeypatch.setenv("HF_TOKEN", "hf_tok")
    settings = {**LOFTQ3, "max_steps": 4, "save_every_steps": 2, "checkpoint_dir": "hf://alice/ckpts"}
    first = qlora_lite.train(tiny_model, data_file, tmp_path / "machine-a", **settings)
    folders = {path.split("/")[1] for path in hub.files("alice/ckpts", branch="checkpoints")}
    assert {"checkpoint-000002", "checkpoint-000004"} < folders and any(
        f.startswith("loftq-base-") for f in folders
    )
    # a fresh machine: the checkpoint of step 4 resumes onto the base fetched from the Hub, verified
    second = qlora_lite.train(tiny_model, data_file, tmp_path / "machine-b", **settings)
    assert second.resumed_from_step == 4
    base = "loftq_base/model.safetensors"
    assert (tmp_path / "machine-b" / base).read_bytes() == (first.output_dir / base).read_bytes()


def test_a_hub_model_id_trains_with_loftq_iterations(hub_server, tiny_model, data_file, tmp_path):
    """LoftQ reads the original weights: by Hub id they come from the (stand-in) Hub at the pinned commit."""
    commit = hub_server.add_folder("org/tiny", tiny_model)
    out = tmp_path / "run"
    qlora_lite.train("org/tiny", data_file, str(out), **{**LOFTQ3, "max_steps": 2})
    record = json.loads((out / "run_record.json").read_text())
    assert record["base_model"]["revision"] == commit and record["loftq_base"]["folder"] == "loftq_base"
    made_from = json.loads((out / "loftq_base" / "manifest.json").read_text())["metadata"]["made_from"]
    assert (made_from["hub_id"], made_from["revision"]) == ("org/tiny", commit)
    # the same base as from the local folder: the iterations read the same original weights
    local = tmp_path / "local"
    qlora_lite.train(tiny_model, data_file, str(local), **{**LOFTQ3, "max_steps": 2})
    assert (out / "loftq_base/model.safetensors").read_bytes() == (
        local / "loftq_base/model.safetensors"
    ).read_bytes()
