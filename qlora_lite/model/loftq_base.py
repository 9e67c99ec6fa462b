"""The 4-bit base that LoftQ with more than one iteration trains on, kept beside the adapter.

Each LoftQ round re-quantizes W - s*B@A (Li et al. 2023, and PEFT's `loftq_init`), so from the second round
on the 4-bit base is no longer the Q(W) that loading the model gives: the adapter is right only on the base
it was fitted with. The run saves that base once, before the first step, as a standard transformers 4-bit
folder `loftq_base/` in the run folder (it loads with plain `AutoModelForCausalLM.from_pretrained`, and the
adapter onto it with plain `PeftModel.from_pretrained`). Its manifest.json lists each file's sha256, as a
checkpoint's does: the folder is copied to the durable place as `loftq-base-<run id>`, verified and taken
from there on a resume on a fresh machine, pushed with the adapter, and every qlora_lite loader uses it as
the adapter's base (model.loading.base_model_of).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.run_files import LOFTQ_BASE, MANIFEST

log = logging.getLogger(__name__)


def needs_own_base(settings: PeftSettings) -> bool:
    """LoftQ past its first round rewrites the 4-bit base (one round keeps the base as loaded)."""
    return settings.method == "lora" and settings.init == "loftq" and settings.loftq_iter > 1


def durable_name(run_id: str) -> str:
    """Its folder's name in the durable place: one per run (a place may hold several runs)."""
    return f"loftq-base-{run_id}"


@contextlib.contextmanager
def bare_base(peft_model: Any) -> Iterator[Any]:
    """The transformers model under `peft_model` with PEFT's wrappers taken out (put back on exit)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    model = peft_model.get_base_model()
    try:
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                inner = module.get_base_layer()
            elif isinstance(module, ModulesToSaveWrapper):
                inner = module.original_module
            else:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, attr) is module:  # not already swapped through an enclosing wrapper
                setattr(parent, attr, inner)
                swapped.append((parent, attr, module))
        yield model
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def weights_sha256(manifest: dict) -> str:
    """One digest of the base's files (the sha256 of each, in name order): what adapters are matched by."""
    joined = "".join(f"{name}:{entry['sha256']}\n" for name, entry in sorted(manifest["files"].items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def loftq_sha256(folder: Path) -> str | None:
    """The weights digest of a saved LoftQ base (from its manifest), None for any other folder."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "loftq_iter" not in (manifest.get("metadata") or {}):
        return None
    return weights_sha256(manifest)


def save(
    peft_model: Any, tokenizer: Any, out: Path, settings: PeftSettings, *, made_from: dict[str, Any]
) -> dict[str, Any]:
    """Write `out/loftq_base/` (atomically: staged, then renamed over an older one) with the base's tokenizer,
    so that it is a whole model folder; returns its record entry."""
    from qlora_lite.checkpoint.durable import publish_dir
    from qlora_lite.checkpoint.manifest import build_manifest, fsync_dir, manifest_bytes, sha256_file

    final = out / LOFTQ_BASE
    staging = out / f".staging-{LOFTQ_BASE}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with bare_base(peft_model) as model:
        model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    files = {}
    for path in _weight_files(staging):
        _fsync(path)  # on disk before the manifest vouches for it, as a checkpoint's files are
        size, sha = sha256_file(path)
        files[path.name] = {"size": size, "sha256": sha}
    metadata = {"loftq_iter": settings.loftq_iter, "made_from": made_from}
    manifest = build_manifest(0, files, metadata)
    (staging / MANIFEST).write_bytes(manifest_bytes(manifest))
    _fsync(staging / MANIFEST)
    fsync_dir(staging)
    publish_dir(staging, final)
    entry = record_entry(manifest)
    log.info("LoftQ (%d iterations) changed the 4-bit base: saved it in %s", settings.loftq_iter, final)
    return entry


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def record_entry(manifest: dict) -> dict[str, Any]:
    """What the run record says of the base: where it is and the digest adapters are matched by."""
    size = sum(int(e["size"]) for e in manifest["files"].values())
    return {"folder": LOFTQ_BASE, "sha256": weights_sha256(manifest), "bytes": size}


def verified_manifest(folder: Path) -> dict | None:
    """The folder's manifest when every file matches it, else None."""
    from qlora_lite.checkpoint.manifest import CheckpointInfo, verify_checkpoint

    if not (folder / MANIFEST).is_file():
        return None
    checked = verify_checkpoint(folder, name=LOFTQ_BASE)
    return checked.manifest if isinstance(checked, CheckpointInfo) else None


def copy_to_durable(store: Any, out: Path) -> None:
    """Copy `out/loftq_base/` to the store's durable place (once per run; a failure is retried after each
    later checkpoint copy, see checkpoint/run_assets.py)."""
    if getattr(store, "assets", None) is not None and store.run_id is not None:
        store.assets.copy(out / LOFTQ_BASE, durable_name(store.run_id))


def restore(out: Path, store: Any, expected_sha256: str | None) -> dict[str, Any]:
    """The run's saved base, verified (`out/loftq_base/`, else fetched from the durable place): its record
    entry. UserError when no intact copy of the base the checkpoints were trained on is found."""
    local = out / LOFTQ_BASE
    manifest = verified_manifest(local)
    backend = getattr(store, "backend", None)
    if manifest is None and backend is not None and store.run_id is not None:
        from qlora_lite.checkpoint.durable import publish_dir

        tmp = out / f".staging-fetch-{LOFTQ_BASE}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            backend.fetch(durable_name(store.run_id), tmp)
            fetched = verified_manifest(tmp)
            if fetched is not None:
                publish_dir(tmp, local)
                manifest = fetched
        except Exception as exc:  # noqa: BLE001
            from qlora_lite.checkpoint.copier import describe_error

            log.warning(
                "could not fetch the LoftQ base from %s: %s", backend.description, describe_error(exc)
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if manifest is None or (expected_sha256 and weights_sha256(manifest) != expected_sha256):
        where = f"{local}" + (f" nor in {backend.description}" if backend is not None else "")
        raise UserError(
            f"this run's checkpoints were trained on the 4-bit base that LoftQ rewrote, and no intact copy of "
            f"it is in {where}: restore that folder, or start afresh with --overwrite (overwrite=True)"
        )
    return record_entry(manifest)


def load_into(peft_model: Any, folder: Path) -> int:
    """Put the saved 4-bit weights of `folder` into every quantized layer PEFT wraps; returns how many."""
    import bitsandbytes as bnb
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    prefix = "base_model.model."
    layers = {
        name[len(prefix) :] + ".weight": module.get_base_layer()
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer) and hasattr(module.get_base_layer().weight, "quant_state")
    }
    found: dict[str, dict[str, torch.Tensor]] = {key: {} for key in layers}
    for path in folder.glob("*.safetensors"):  # only the wrapped layers' tensors are read, not the whole base
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                # "<key>" is the packed weight; "<key>.absmax", "<key>.quant_state.bitsandbytes__nf4", ... its stats
                for key, parts in found.items():
                    if name == key or name.startswith(key + "."):
                        parts[name[len(key) + 1 :]] = handle.get_tensor(name)
    for key, base in layers.items():
        data, stats = found[key].pop("", None), found[key]
        if data is None or not stats:
            raise UserError(f"{folder} holds no 4-bit weight {key}: it is not this run's LoftQ base")
        base.weight = bnb.nn.Params4bit.from_prequantized(
            data, stats, requires_grad=False, device=base.weight.device, module=base
        )
    return len(layers)
