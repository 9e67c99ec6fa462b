"""What a run folder says about itself: the run record (JSON), the per-step log and the loss plot."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

from qlora_lite.run_files import LOSS_PLOT, MANIFEST, ORIGIN_FILE, RUN_CONFIG, RUN_RECORD, STEP_LOG  # noqa: F401

TRACKED_PACKAGES = (
    "qlora-lite",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "trl",
    "datasets",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_identity(model) -> dict[str, str | None]:
    """Base model path plus a revision: the Hub commit sha for a Hub model (a `ModelSource`), else a hash of
    the local config + weights index. `hub_id` names the Hub repo (also for a local folder made from one)."""
    if hasattr(model, "config_path"):  # a resolved ModelSource
        if model.on_hub:
            return {
                "path": model.hub_id,
                "hub_id": model.hub_id,
                "revision": model.revision,  # the commit sha: what a re-run must match
                "requested_revision": model.requested_revision,
                "config_sha256": hashlib.sha256(model.config_path.read_bytes()).hexdigest(),
                "license": model.license,
            }
        model = model.name
    model_path = str(model)
    path = Path(model_path)
    identity: dict[str, str | None] = {
        "path": model_path,
        "revision": None,
        "config_sha256": None,
        "hub_id": None,
    }
    if not path.is_dir():
        identity["hub_id"] = model_path  # loaded from the Hub by id
    origin = path / ORIGIN_FILE
    if origin.is_file():  # a folder made from a Hub model (the demo's converted GGUF) says where it came from
        identity["hub_id"] = json.loads(origin.read_text()).get("hub_id")
    if (path / MANIFEST).is_file():  # a base LoftQ rewrote (model/loftq_base.py): told apart by its weights
        from qlora_lite.model.loftq_base import loftq_sha256

        identity["loftq_sha256"] = loftq_sha256(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            identity["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
        digest = hashlib.sha256()
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = weights.stat()
            digest.update(f"{weights.name}:{stat.st_size}".encode())
            # The safetensors header holds every tensor's name, dtype, shape and offsets: cheap and telling.
            with open(weights, "rb") as handle:
                digest.update(handle.read(1 << 20))
        identity["revision"] = "local-" + digest.hexdigest()[:16]
    return identity


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rewrite_step_log(run_dir: Path, history: list[dict], eval_history: list[dict]) -> None:
    """Start the step log afresh from a (resumed) state: rows a killed process wrote after its last
    checkpoint are dropped, so the log of a resumed run reads like the log of an uninterrupted one."""
    rows = sorted([*history, *eval_history], key=lambda r: (r["step"], "eval_loss" in r))
    tmp = run_dir / (STEP_LOG + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, run_dir / STEP_LOG)


def append_step_log(run_dir: Path, row: dict) -> None:
    with open(run_dir / STEP_LOG, "a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")


def plot_loss(history: list[dict], eval_history: list[dict], path: Path, title: str) -> Path | None:
    """Training loss per optimizer step (and eval loss when measured) as a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss", linewidth=1.2)
    if eval_history:
        ax.plot(
            [r["step"] for r in eval_history], [r["eval_loss"] for r in eval_history], "o-", label="eval loss"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_run_record(
    *, config, model_path, plan, lora, prepared, identity, total_steps, eval_every, metrics, state, hardware
) -> dict:
    """The machine-readable description of a finished run (everything needed to reproduce or cite it)."""
    return {
        "qlora_lite_run": 1,
        "task": "causal_lm",
        "base_model": model_identity(model_path),
        "quantization": {
            "method": plan.quantization,
            "double_quant": plan.double_quant,
            "compute_dtype": plan.compute_dtype,
        },
        "lora": {
            "r": lora.r,
            "alpha": lora.lora_alpha,
            "dropout": lora.dropout,
            "target_modules": lora.target_modules,
        },
        "peft": lora.to_record(),  # the method: LoRA/DoRA/IA3/prompt/prefix tuning, init, rsLoRA, LoRA+
        "plan": plan.to_dict(),
        "identity": identity,
        "hyperparameters": {
            **config.to_record()["settings"],
            "total_steps": total_steps,
            "eval_every": eval_every,
        },
        "data": {
            "source": str(config.data)
            if isinstance(config.data, (str, os.PathLike))
            else type(config.data).__name__,
            "format": prepared.spec.name,
            "columns": prepared.spec.columns,
            "format_reason": prepared.spec.reason,
            "fingerprint": prepared.fingerprint,
            "records": prepared.n_records,
            "train_examples": len(prepared.train),
            "eval_examples": len(prepared.eval),
            "truncated_examples": prepared.stats.n_truncated,
            "dropped_examples": prepared.stats.n_dropped,
        },
        "metrics": metrics,
        "router_sample": list(getattr(prepared, "router_sample", [])),
        "history": state.history,
        "eval_history": state.eval_history,
        "hardware": hardware.to_dict(),
        "versions": library_versions(),
        "created_unix": int(time.time()),
    }
