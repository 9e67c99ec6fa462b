import os

# Tests never reach a model hub: everything they load is built in-process or shipped in a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from models_util import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """{architecture: model folder} for every tiny test architecture, built once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    from models_util import ARCHITECTURES

    return {arch: str(build_tiny_model(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local HTTP stand-in of the Hub (tests/hub_server.py), started, with huggingface_hub, transformers
    and datasets pointed at it (online mode, a fresh cache under tmp_path). Accounts: DEFAULT_ACCOUNTS."""
    from hub_server import HubServer

    server = HubServer()
    with server.serving(monkeypatch, cache_dir=tmp_path / "hf-cache"):
        yield server
