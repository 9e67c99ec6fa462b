"""Hub: push with a model card, token handling, Hub checkpoints and resume, load back by id.

The network boundary (`qlora_lite.hub.client.make_client` -> HubClient) is replaced by tests/fake_hub.py, a fake
that keeps repos in a local folder and raises huggingface_hub's own error types; everything above it
runs for real. The run folder is written by hand (no training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import struct
import zlib
from pathlib import Path

import httpx2
import numpy as np
import pytest
from fake_hub import FakeHub, FakeHubClient, http_error
from huggingface_hub import ModelCard
from safetensors.numpy import save_file

from qlora_lite.checkpoint.store import CheckpointStore
from qlora_lite.cli.hub import add_push_parser, run_push
from qlora_lite.errors import UserError
from qlora_lite.hub import client as hub_client
from qlora_lite.hub import push as hub
from qlora_lite.hub import token as hub_token
from qlora_lite.hub.checkpoints import HubBackend, backend_from_spec

TOKEN = "hf_TestSecretToken0123456789abcdefXYZ"
READ_TOKEN = "hf_ReadOnlyToken0123456789abcdefXYZ"
FINE_TOKEN = "hf_FineGrainedToken0123456789abcdef"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
UPLOADED = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "loss.png",
    "run_record.json", "tokenizer.json", "tokenizer_config.json",
}  # fmt: skip


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\xff\x00\x00" * 2 + b"\x00" + b"\x00\x00\xff" * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def write_run(folder: Path, base_path: str = BASE_ID, revision: str | None = None) -> Path:
    """A finished run folder as train() leaves it, with realistic keys and small files."""
    folder.mkdir(parents=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"base_model_name_or_path": base_path, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16,
             "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": targets, "bias": "none",
             "inference_mode": True, "use_dora": False, "use_rslora": False, "peft_version": "0.21.2"},
            indent=2,
        )
    )  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight": rng.standard_normal(
            (16, 64) if ab == "A" else (64, 16)
        ).astype(np.float32)
        for ab in "AB"
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}})
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "loss.png").write_bytes(tiny_png())
    (folder / "steps.jsonl").write_text('{"loss": 2.1, "step": 1}\n')
    (folder / "run_config.json").write_text(json.dumps({"model": base_path, "output_dir": str(folder)}))
    (folder / "README.md").write_text("---\nbase_model: /some/local/path\n---\nPEFT's default card\n")
    (folder / "checkpoints" / "checkpoint-000060").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-000060" / "optimizer.pt").write_bytes(b"x" * 100)
    record = {
        "qlora_lite_run": 1,
        "task": "causal_lm",
        "base_model": {"path": base_path, "revision": revision, "config_sha256": "ab" * 32},
        "quantization": {"method": "nf4", "double_quant": True, "compute_dtype": "bf16"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "plan": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "effective_batch_size": 8,
                 "max_seq_length": 512, "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit",
                 "attn_implementation": "sdpa", "peak_memory_bytes": 3_200_000_000, "compute_dtype": "bf16"},
        "hyperparameters": {"learning_rate": 0.0002, "lr_scheduler": "cosine", "max_steps": 60},
        "data": {"source": "/content/orders.jsonl", "format": "instruction", "fingerprint": "7e66" * 16,
                 "records": 480, "train_examples": 432, "eval_examples": 48, "truncated_examples": 3},
        "metrics": {"train_loss": 0.0213, "eval_loss": 0.0117, "eval_perplexity": 1.0118, "steps": 60,
                    "seconds": 241.5, "tokens_per_second": 1520.4, "tokens_seen": 367_000},
        "hardware": {"accelerator": "cuda", "environment": "colab", "cpu_count": 2,
                     "ram_total_bytes": 13_600_000_000,
                     "gpus": [{"name": "Tesla T4", "total_memory_bytes": 15_828_320_256}]},
        "history": [{"step": 1, "loss": 2.1}],
        "eval_history": [{"step": 60, "eval_loss": 0.0117}],
        "versions": {"peft": "0.21.2", "transformers": "5.24.0"},
    }  # fmt: skip
    (folder / "run_record.json").write_text(json.dumps(record, indent=2))
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeHub:
    """A fake Hub with alice (write, org acme), a read-only token and a fine-grained one; HF_TOKEN=alice."""
    accounts = {
        TOKEN: {"name": "alice", "orgs": ["acme"], "role": "write"},
        READ_TOKEN: {"name": "alice", "orgs": [], "role": "read"},
        FINE_TOKEN: {"name": "alice", "orgs": [], "role": "fineGrained"},
    }
    server = FakeHub(tmp_path / "hub", accounts)
    monkeypatch.setattr(hub_client, "make_client", lambda token: FakeHubClient(server, token))
    monkeypatch.setattr(hub_client, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return server


@pytest.fixture
def run(tmp_path) -> Path:
    return write_run(tmp_path / "run")


# ------------------------------------------------------------------------------------------------- push


def test_push_creates_a_private_repo_in_one_commit_with_a_card(fake, run):
    before = snapshot(run)
    result = hub.push(run, "alice/orders-adapter")
    assert fake.private("alice/orders-adapter")
    (commit,) = fake.commits("alice/orders-adapter")
    assert set(commit["paths"]) == UPLOADED  # no checkpoints/, steps.jsonl, run_config.json, PEFT's README
    assert commit["message"] == "qlora_lite: SmolLM2-135M-Instruct LoRA r16, 60 steps, eval loss 0.0117"
    assert result.commit_url.endswith(commit["oid"]) and set(result.files) == UPLOADED
    assert result.repo_url == "https://hub.example/alice/orders-adapter"
    remote = fake.files("alice/orders-adapter")
    for name in UPLOADED - {"README.md", "run_record.json"}:
        assert remote[name] == (run / name).read_bytes(), name
    pushed_record, local_record = (
        json.loads(remote["run_record.json"]),
        json.loads((run / "run_record.json").read_text()),
    )
    assert pushed_record["data"]["source"] == "orders.jsonl"  # the training machine's folders stay home
    assert {**pushed_record, "data": local_record["data"]} == local_record
    assert snapshot(run) == before

    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == BASE_ID
    assert card.data.library_name == "peft"
    assert {"qlora_lite", "peft", "lora", "qlora", f"base_model:adapter:{BASE_ID}"} <= set(card.data.tags)
    assert card.data.license is None and card.data.datasets is None
    text = card.text
    assert "![training and eval loss](loss.png)" in text
    assert "1 x Tesla T4" in text and "colab" in text and "4 x 2 = 8" in text and "paged_adamw_8bit" in text
    assert "instruction format, 480 records (432 train / 48 eval)" in text and "| steps | 60 |" in text
    assert "| eval loss | 0.0117 |" in text and "4.0 min" in text
    assert 'PeftModel.from_pretrained(base, "alice/orders-adapter")' in text
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_ID}")' in text
    assert 'generate("Hello!", adapter="alice/orders-adapter")' in text
    assert "/content/orders.jsonl" not in text  # no local paths in a public document


def test_card_never_names_a_local_base_path(fake, tmp_path):
    local = write_run(
        tmp_path / "local", base_path="/home/alice/models/my-base", revision="local-0123456789abcdef"
    )
    hub.push(local, "alice/local-base")
    remote = fake.files("alice/local-base")
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model is None and not any("base_model:" in t for t in card.data.tags)
    assert "/home/alice" not in remote["README.md"].decode() and "`my-base`" in card.text
    assert remote["adapter_config.json"] == (local / "adapter_config.json").read_bytes()

    cached = "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc"
    from_cache = write_run(tmp_path / "cache", base_path=cached, revision="local-0123456789abcdef")
    hub.push(from_cache, "alice/cached-base", license="apache-2.0", datasets=["acme/orders"])
    remote = fake.files("alice/cached-base")
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["acme/orders"]
    assert json.loads(remote["adapter_config.json"])["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B"


def test_existing_repo_keeps_its_visibility_with_a_warning(fake, run, caplog):
    fake.add_repo("alice/shared", private=False)
    with caplog.at_level(logging.WARNING, logger="qlora_lite.hub"):
        hub.push(run, "alice/shared", private=True)
    assert not fake.private("alice/shared")
    assert "alice/shared exists and is PUBLIC; push does not change its visibility" in caplog.text
    assert len(fake.commits("alice/shared")) == 1


def test_push_to_a_branch_with_a_message_and_a_bare_name(fake, run):
    hub.push(run, "orders", revision="v2", commit_message="second try")
    (commit,) = fake.commits("alice/orders")
    assert commit["revision"] == "v2" and commit["message"] == "second try"
    assert set(fake.files("alice/orders", "v2")) == UPLOADED and fake.files("alice/orders") == {}


def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.mark.parametrize(
    "case, repo_id, expected",
    [
        ("no token", "alice/x", "set HF_TOKEN"),
        ("read-only token", "alice/x", "the token is read-only"),
        ("fine-grained token without write", "alice/x", "may not write there"),
        ("other owner", "bob/x", "the namespace 'bob' is not yours"),
        ("invalid id", "alice/bad--name", "repo id 'alice/bad--name' is invalid"),
        ("invalid id", "a/b/c", "is invalid"),
        ("revoked token", "alice/x", "rejected the token"),
        ("network failure mid-upload", "alice/x", "nothing was published; the local run is untouched"),
        ("offline", "alice/x", "HF_HUB_OFFLINE=1 forbids the Hub"),
    ],
)
def test_push_mistakes_are_clear_and_leave_the_run_untouched(
    fake, run, tmp_path, monkeypatch, case, repo_id, expected
):
    from huggingface_hub.errors import OfflineModeIsEnabled

    if case == "no token":
        no_token(monkeypatch, tmp_path)
        assert "hf auth login" in hub.TOKEN_HELP
    elif case == "read-only token":
        monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    elif case == "fine-grained token without write":
        monkeypatch.setenv("HF_TOKEN", FINE_TOKEN)
    elif case == "revoked token":
        monkeypatch.setenv("HF_TOKEN", "hf_RevokedToken0123456789")
    elif case == "network failure mid-upload":
        fake.fail_next("create_commit", httpx2.ConnectError("connection reset by peer"), times=4)
    elif case == "offline":
        fake.fail_next("whoami", OfflineModeIsEnabled("offline"))
    before = snapshot(run)
    with pytest.raises(UserError, match=expected) as err:
        hub.push(run, repo_id)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert snapshot(run) == before
    assert not any(fake.commits(r) for r in ("alice/x", "bob/x") if fake.exists(r))


def test_push_refuses_a_run_folder_that_is_not_finished(fake, tmp_path):
    with pytest.raises(UserError, match="not found"):
        hub.push(tmp_path / "missing", "alice/x")
    partial = write_run(tmp_path / "partial")
    (partial / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="lacks adapter_model.safetensors"):
        hub.push(partial, "alice/x")
    assert fake.calls == []


def test_transient_failures_are_retried(fake, run, caplog):
    fake.fail_next("create_commit", http_error(503, "https://hub.example/api/models/alice/x/commit/main"), 2)
    fake.fail_next("list_files", httpx2.ReadTimeout("read timed out"))
    hub.push(run, "alice/x")
    assert [c for c, _ in fake.calls].count("create_commit") == 3
    assert len(fake.commits("alice/x")) == 1
    assert "retrying" in caplog.text


# ----------------------------------------------------------------------------------------------- tokens


def test_resolve_token_sources(monkeypatch, tmp_path):
    no_token_path = tmp_path / "token"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(no_token_path))
    monkeypatch.setattr(hub_token, "in_colab", lambda: False)
    assert hub.resolve_token() is None
    no_token_path.write_text("hf_FromTheLoginFile0123456789\n")
    assert hub.resolve_token() == "hf_FromTheLoginFile0123456789"
    monkeypatch.setenv("HF_TOKEN", "hf_FromTheEnvironment0123456789")
    assert hub.resolve_token() == "hf_FromTheEnvironment0123456789"
    assert hub.resolve_token("hf_Explicit0123456789") == "hf_Explicit0123456789"


def test_resolve_token_reads_the_colab_secret_in_the_notebook_process(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "none"))
    userdata = types.SimpleNamespace(
        get=lambda key: "hf_ColabSecret0123456789" if key == "HF_TOKEN" else None
    )
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(hub_token, "in_colab", lambda: True)
    assert hub.resolve_token() == "hf_ColabSecret0123456789"


def test_the_token_is_in_no_written_uploaded_or_logged_byte(fake, run, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    hub.push(run, "alice/x")
    fake.fail_next("create_commit", httpx2.ConnectError(f"proxy said {TOKEN}"), times=4)
    with pytest.raises(UserError) as err:
        hub.push(run, "alice/y")
    assert TOKEN not in str(err.value)
    logging.getLogger("qlora_lite.test").warning("a careless message with %s inside", TOKEN)
    backend = backend_from_spec("hf://alice/ckpt")
    with CheckpointStore(tmp_path / "ckpt", backend=backend, background=False) as store:
        store.save(5, {"adapter.safetensors": b"a" * 2000, "state.json": b"{}"}, {"loss": 1.0})
    assert "hf_***" in caplog.text and TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
    assert fake.uploaded and all(TOKEN.encode() not in data for data in fake.uploaded)


def test_a_token_inside_the_run_folder_is_never_uploaded(fake, run):
    record = json.loads((run / "run_record.json").read_text())
    record["hyperparameters"]["hub_token"] = TOKEN
    (run / "run_record.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="run_record.json contains your Hugging Face token"):
        hub.push(run, "alice/x")
    assert fake.uploaded == [] or not fake.commits("alice/x")


# --------------------------------------------------------------------------------- checkpoints on the Hub


def ckpt_files(step: int) -> dict[str, bytes]:
    return {
        "adapter.safetensors": bytes([step % 251]) * 3000,
        "optimizer.pt": b"o" * (500 + step),
        "rng.json": b"{}",
    }


def test_hub_backend_upload_list_fetch_delete(fake, tmp_path):
    backend = backend_from_spec("hf://alice/run-ckpt")
    assert isinstance(backend, HubBackend) and backend.branch == "checkpoints"
    assert backend.list() == []
    local = CheckpointStore(tmp_path / "local").save(7, ckpt_files(7), {"loss": 1.5})
    backend.upload(local.path, local.name)
    assert fake.private("alice/run-ckpt") and backend.list() == ["checkpoint-000007"]
    (commit,) = fake.commits("alice/run-ckpt")
    assert commit["revision"] == "checkpoints" and len(commit["paths"]) == 4  # three files + manifest
    assert fake.files("alice/run-ckpt") == {}  # main stays free for the adapter
    backend.fetch("checkpoint-000007", tmp_path / "fetched")
    assert snapshot(tmp_path / "fetched") == snapshot(local.path)
    backend.delete("checkpoint-000007")
    assert backend.list() == [] and fake.files("alice/run-ckpt", "checkpoints") == {}
    assert len(fake.commits("alice/run-ckpt")) == 2


def test_reupload_under_the_same_name_leaves_no_stale_file(fake, tmp_path):
    backend = backend_from_spec("hf://alice/run-ckpt@attempt2")
    first = CheckpointStore(tmp_path / "a").save(3, {**ckpt_files(3), "extra.bin": b"e"}, {})
    backend.upload(first.path, first.name)
    second = CheckpointStore(tmp_path / "b").save(3, ckpt_files(3), {})
    backend.upload(second.path, second.name)
    names = set(fake.files("alice/run-ckpt", "attempt2"))
    assert names == {f"checkpoints/checkpoint-000003/{f}" for f in [*ckpt_files(3), "manifest.json"]}


def test_rotation_on_the_hub_leaves_no_stale_files(fake, tmp_path):
    backend = backend_from_spec("hf://alice/run-ckpt")
    with CheckpointStore(tmp_path / "local", keep=2, background=False, backend=backend) as store:
        for step in (10, 20, 30, 40):
            store.save(step, ckpt_files(step), {"step": step})
    assert backend.list() == ["checkpoint-000030", "checkpoint-000040"]
    remote = set(fake.files("alice/run-ckpt", "checkpoints"))
    expected = {
        f"checkpoints/checkpoint-0000{s}/{f}" for s in (30, 40) for f in [*ckpt_files(0), "manifest.json"]
    }
    assert remote == expected


def test_fresh_machine_resumes_from_the_newest_checkpoint_that_verifies(fake, tmp_path, caplog):
    backend = backend_from_spec("hf://alice/run-ckpt")
    with CheckpointStore(tmp_path / "vm1", keep=3, background=False, backend=backend) as store:
        for step in (10, 20, 30):
            store.save(step, ckpt_files(step), {"step": step})
    corrupt = fake.path("alice/run-ckpt", "checkpoints", "checkpoints/checkpoint-000030/adapter.safetensors")
    corrupt.write_bytes(b"\x00" * corrupt.stat().st_size)  # same size, wrong bytes

    fresh = tmp_path / "vm2" / "checkpoints"
    store = CheckpointStore(fresh, backend=backend_from_spec("hf://alice/run-ckpt"), background=False)
    with caplog.at_level(logging.WARNING):
        info = store.latest()
    assert info is not None and info.step == 20 and info.metadata == {"step": 20}
    assert store.read(info, "adapter.safetensors") == ckpt_files(20)["adapter.safetensors"]
    assert "checkpoint-000030" in caplog.text and "sha256" in caplog.text
    assert sorted(p.name for p in fresh.iterdir()) == ["checkpoint-000020"]  # no leftover downloads
    store.close()


def test_failed_hub_checkpoint_uploads_never_stop_training(fake, tmp_path, caplog):
    backend = backend_from_spec("hf://alice/run-ckpt")
    fake.fail_next(
        "create_commit", http_error(503, "https://hub.example/api/models/alice/run-ckpt/commit"), 2
    )
    with CheckpointStore(tmp_path / "local", background=False, backend=backend) as store:
        store.save(1, ckpt_files(1), {})  # retried inside the backend: succeeds
        assert store.durable_step == 1
        fake.fail_next("create_commit", httpx2.ConnectError("network is unreachable"), times=4)
        info = store.save(2, ckpt_files(2), {})  # fails after 4 tries: reported, not raised
        assert info.step == 2 and "network is unreachable" in store.last_durable_error
        assert store.flush()  # the network is back: the queued copy goes up
        assert backend.list() == ["checkpoint-000001", "checkpoint-000002"]
    assert caplog.text.count("could not copy checkpoint-000002") == 1

    fake.fail_next("create_commit", http_error(403, "https://hub.example/api/models/alice/run-ckpt/commit"))
    with CheckpointStore(tmp_path / "local2", background=False, backend=backend) as store:
        store.save(3, ckpt_files(3), {})
        assert "may not write there" in store.last_durable_error


def test_backend_from_spec(fake, monkeypatch, tmp_path):
    assert backend_from_spec("/content/drive/MyDrive/run") is None
    assert backend_from_spec("hf://alice/ckpt@run-7").branch == "run-7"
    for bad in ("hf://alice", "hf://alice/bad--name"):
        with pytest.raises(UserError, match="hf://|invalid"):
            backend_from_spec(bad)
    no_token(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="need a Hugging Face token"):
        backend_from_spec("hf://alice/ckpt")


# ------------------------------------------------------------------------------------------- load back


def test_resolve_adapter_local_folder_and_hub_id(fake, run):
    assert hub.resolve_adapter(run) == run
    with pytest.raises(UserError, match="--revision applies to Hub repo ids only"):
        hub.resolve_adapter(run, revision="v2")
    hub.push(run, "alice/orders", revision="v2")
    folder = hub.resolve_adapter("alice/orders", revision="v2")
    assert (folder / "adapter_config.json").read_bytes() == (run / "adapter_config.json").read_bytes()
    assert (folder / "run_record.json").is_file() and (folder / "tokenizer.json").is_file()
    with pytest.raises(UserError, match="revision"):
        hub.resolve_adapter("alice/orders", revision="v3")
    with pytest.raises(UserError, match="no such repo"):
        hub.resolve_adapter("alice/missing")
    with pytest.raises(UserError, match="not found"):
        hub.resolve_adapter("./runs/missing")
    fake.add_repo("alice/not-an-adapter", private=False, files={"config.json": b"{}"})
    with pytest.raises(UserError, match="not a PEFT adapter"):
        hub.resolve_adapter("alice/not-an-adapter")


# ------------------------------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-lite")
    add_push_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_push(fake, run, capsys):
    assert run_push(parse(["push", str(run), "alice/cli", "--public", "--message", "from the CLI"])) == 0
    out = capsys.readouterr().out
    assert "pushed 8 files to https://hub.example/alice/cli" in out and "/commit/" in out
    assert not fake.private("alice/cli") and fake.commits("alice/cli")[0]["message"] == "from the CLI"
    args = parse(["push", str(run), "alice/cli2"])
    assert args.private and args.revision is None
    with pytest.raises(SystemExit):
        parse(["push", str(run), "alice/x", "--private", "--public"])
    with pytest.raises(UserError, match="not yours"):
        run_push(parse(["push", str(run), "bob/x"]))


def test_cli_main_exits_2_on_push_mistakes(fake, run, capsys):
    from qlora_lite.cli import main as cli

    assert cli.main(["push", str(run), "bob/x"]) == 2
    assert "not yours" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the boundary itself


def test_the_fake_has_the_real_clients_interface():
    import inspect

    public = {n for n, v in vars(hub_client.HubClient).items() if callable(v) and not n.startswith("_")}
    assert public == {n for n, v in vars(FakeHubClient).items() if callable(v) and not n.startswith("_")}
    for name in public:
        real = inspect.signature(getattr(hub_client.HubClient, name))
        fake_sig = inspect.signature(getattr(FakeHubClient, name))
        assert list(real.parameters) == list(fake_sig.parameters), name


def test_the_real_client_in_offline_mode_gives_clear_errors(monkeypatch, run, tmp_path):
    """HF_HUB_OFFLINE=1 (conftest): the real HfApi refuses before any network access."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_client, "RETRY_DELAYS", (0.0,))
    assert repr(hub_client.make_client(TOKEN)) == "HubClient(endpoint='https://huggingface.co')"
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 forbids the Hub"):
        hub.push(run, "alice/x")
    with pytest.raises(UserError, match="nor in the Hugging Face cache"):
        hub.resolve_adapter("alice/never-downloaded")


def test_a_verification_mismatch_is_reported(fake, run, monkeypatch):
    real_list = FakeHubClient.list_files

    def shrunk(self, repo_id, **kwargs):
        files = real_list(self, repo_id, **kwargs)
        files["adapter_model.safetensors"] = type(files["adapter_model.safetensors"])(1, None)
        return files

    monkeypatch.setattr(FakeHubClient, "list_files", shrunk)
    with pytest.raises(UserError, match="adapter_model.safetensors missing or different"):
        hub.push(run, "alice/x")
    monkeypatch.setattr(FakeHubClient, "list_files", real_list)
    fake.fail_next("list_files", httpx2.ConnectError("reset"), times=4)
    with pytest.raises(UserError, match="listing alice/x2 to verify it failed"):
        hub.push(run, "alice/x2")
