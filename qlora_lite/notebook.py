"""Helpers for the Colab notebooks in `colab/`: where checkpoints go, one-sentence errors, plots, samples.

    from qlora_lite import notebook
    with notebook.friendly_errors():
        setup = notebook.setup_colab("my-run", checkpoint_to="auto")   # GPU? Drive? token?
        data = notebook.resolve_data("train.jsonl")                      # path, https URL or "demo"
        result = qlora_lite.train(model, data.source, "runs/my-run", checkpoint_dir=setup.checkpoint_dir)
    notebook.show_loss_curve(result.output_dir)

Mistakes a user can make in a cell (CPU runtime, Drive not mounted, a data path or URL that does not
exist, no token when the Hub is asked for) raise `UserError`; `friendly_errors()` turns any `UserError`
into one line in the notebook instead of a stack trace, and still stops "Run all".

Smoke mode (`QLORA_LITE_NOTEBOOK_SMOKE=1`, used by CI): few steps, few samples, and a temporary folder
standing in for Google Drive, so every notebook runs on a CPU in about a minute.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qlora_lite.checkpoint.durable import (
    DRIVE_ROOT_ENV,
    MOUNT_DRIVE_HINT,
    check_drive_path,
    default_durable_root,
    drive_mounted,
)
from qlora_lite.checkpoint.durable import drive_root as drive_root
from qlora_lite.demo.colab import demo_model  # noqa: F401 (the quickstart cell calls it from here)
from qlora_lite.errors import UserError
from qlora_lite.planner.hardware import HardwareProfile, detect_environment
from qlora_lite.planner.profiles import resolve_hardware

log = logging.getLogger(__name__)

SMOKE_ENV = "QLORA_LITE_NOTEBOOK_SMOKE"
GPU_HINT = "click Runtime > Change runtime type, choose a GPU (e.g. T4 GPU), save, and run this cell again"
TOKEN_HINT = (
    "add a Hugging Face token with write access as the secret HF_TOKEN (key icon in Colab's left bar, "
    "with notebook access on) or set the HF_TOKEN environment variable, then run this cell again"
)
# The knobs a smoke run keeps small whatever the notebook asks for.
SMOKE_SETTINGS: dict[str, Any] = {"max_steps": 3, "effective_batch_size": 2}
_HUB_REPO = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+$")

T = TypeVar("T")


def smoke_mode() -> bool:
    """True when $QLORA_LITE_NOTEBOOK_SMOKE is set to something other than '', '0', 'false', 'no'."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pick(full: T, smoke: T) -> T:
    """`full` normally, `smoke` in smoke mode: `n_samples = pick(8, 1)`."""
    return smoke if smoke_mode() else full


def train_settings(**settings: Any) -> dict[str, Any]:
    """`settings` for `train()`, with steps and batch cut to a few examples in smoke mode."""
    if smoke_mode():
        settings = {**settings, **SMOKE_SETTINGS}
        settings.pop("gradient_accumulation_steps", None)
        settings.pop("micro_batch_size", None)
    return settings


# ------------------------------------------------------------------------------------------ errors


class NotebookError(Exception):
    """A mistake the user can fix, shown by IPython as one line instead of a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn a `UserError` (or a stop button press) into one clear line in the notebook.

    The cell still fails, so "Run all" stops there, but IPython shows only the sentence. Any other
    exception is a bug and keeps its traceback.
    """
    try:
        yield
    except UserError as exc:
        raise NotebookError(_one_line(str(exc))) from None
    except KeyboardInterrupt:
        raise NotebookError("Stopped. Run this cell again to continue from the last checkpoint.") from None


def _one_line(message: str) -> str:
    return " ".join(message.split())


# ------------------------------------------------------------------------------------------ setup


@dataclass(frozen=True)
class NotebookSetup:
    """What this runtime has and where a run's checkpoints go (pass `checkpoint_dir` to `train()`)."""

    hardware: HardwareProfile
    environment: str  # "colab" | "kaggle" | "local"
    checkpoint_dir: str | None  # a Drive folder, hf://owner/repo, or None (local checkpoints only)
    drive_mounted: bool
    hub_token: bool
    smoke: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gpu(self) -> str | None:
        return self.hardware.gpus[0].name if self.hardware.gpus else None

    def describe(self) -> str:
        device = f"GPU: {self.gpu}" if self.gpu else f"no GPU: training runs on {self.hardware.accelerator}"
        where = self.checkpoint_dir or "this machine only (<output>/checkpoints)"
        lines = [f"runtime: {self.environment}, {device}", f"checkpoints: {where}"]
        if self.smoke:
            lines.append(f"smoke mode ({SMOKE_ENV}): a few steps only")
        return "\n".join(lines + list(self.notes))


def hub_token() -> str | None:
    """The Hugging Face token from $HF_TOKEN, `hf auth login`, or the Colab secret HF_TOKEN.

    A token read from the Colab secret is exported as HF_TOKEN, so that `!qlora-lite ...` subprocesses and
    background uploads see it too (they cannot read Colab secrets). The token is never logged.
    """
    from qlora_lite.hub.token import Token, resolve_token

    token = resolve_token()
    if token and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = str(token)
    return Token(token) if token else None  # shown as 'hf_***' when it is a cell's value


def setup_colab(
    run_name: str,
    checkpoint_to: str | None = "auto",
    *,
    allow_cpu: bool = False,
    hardware: HardwareProfile | None = None,
) -> NotebookSetup:
    """Check the runtime and decide where checkpoints go; raise UserError with the fix when it can't work.

    `checkpoint_to`: "auto" (Google Drive when mounted, else this machine), "drive" (Drive, required),
    "hf://owner/repo" (the Hub, needs a token), another folder, or None (this machine only).
    A Colab runtime without a GPU is refused unless `allow_cpu`. In smoke mode a temporary folder stands in
    for Google Drive (unless $QLORA_LITE_DRIVE_ROOT is set).
    """
    smoke = smoke_mode()
    if smoke and not os.environ.get(DRIVE_ROOT_ENV):
        os.environ[DRIVE_ROOT_ENV] = tempfile.mkdtemp(prefix="qlora-lite-fake-drive-")
    environment = detect_environment()
    hw = resolve_hardware(hardware)  # the one place hardware is decided (a profile, a name, or detect)
    notes: list[str] = []
    if hw.accelerator != "cuda":
        if environment == "colab" and not allow_cpu:
            raise UserError(f"This Colab runtime has no GPU: {GPU_HINT}.")
        notes.append(
            "No GPU found: training runs on the CPU (fine for the demo, slow for real models)."
            + (f" To use a GPU, {GPU_HINT}." if environment == "colab" else "")
        )
    mounted = drive_mounted()  # a mount point, not a bare folder left where Drive would be
    token = False
    target: str | None
    if checkpoint_to in (None, "", "local"):
        target = None
    elif checkpoint_to in ("auto", "drive"):
        durable = default_durable_root(run_name) if mounted else None
        target = str(durable) if durable is not None else None
        if durable is None and checkpoint_to == "drive":
            raise UserError(
                f"Google Drive is not mounted: run `{MOUNT_DRIVE_HINT}`, then run this cell again."
            )
        if durable is None and environment == "colab":
            notes.append(
                "Google Drive is not mounted, so checkpoints vanish with this VM; to keep them, run "
                f"`{MOUNT_DRIVE_HINT}` and run this cell again."
            )
    elif checkpoint_to.startswith("hf://"):
        if not _HUB_REPO.match(checkpoint_to):
            raise UserError(
                f"checkpoint_to={checkpoint_to!r} is not a Hub repo: write it as hf://<user or org>/<repo name>."
            )
        token = hub_token() is not None
        if not token:
            raise UserError(f"Checkpoints to the Hub ({checkpoint_to}) need a token: {TOKEN_HINT}.")
        target = checkpoint_to
    else:
        folder = Path(checkpoint_to).expanduser()
        check_drive_path(folder)  # writing there unmounted would fill the local disk, which dies with the VM
        target = str(folder)
    return NotebookSetup(hw, environment, target, mounted, token, smoke, tuple(notes))


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class NotebookData:
    """Training data for `train(data=...)`, plus held-out rows and prompts for before/after samples."""

    source: Any  # a file path, or a list of records
    description: str
    held_out: list[dict] = field(default_factory=list)  # demo rows the model never trains on
    sample_prompts: list[Any] = field(default_factory=list)  # prompts (or chats) for before/after


def resolve_data(
    data: Any,
    download_dir: str | os.PathLike = "data",
    *,
    n_train: int | None = None,
    n_held_out: int | None = None,
) -> NotebookData:
    """`data` as the notebooks accept it: "demo" (the built-in task), a Hub data set id (`org/name`), a file
    path, an https URL, or records.

    A URL is downloaded once into `download_dir`. A path or URL that does not exist raises UserError.
    """
    n_held_out = pick(3, 1) if n_held_out is None else n_held_out
    if data is None or (isinstance(data, str) and data.strip().lower() == "demo"):
        from qlora_lite.demo.task import make_dataset, prompt_for

        train, held_out = make_dataset(n_train=n_train or pick(480, 16), n_eval=n_held_out)
        return NotebookData(
            train,
            f"the built-in demo task (order text -> JSON): {len(train)} examples",
            held_out,
            [prompt_for(r) for r in held_out],
        )
    from qlora_lite.data.hub_dataset import is_hub_dataset_id

    if is_hub_dataset_id(data):
        records = _load(data)
        return NotebookData(
            data, f"{data} (a Hub data set): {len(records)} examples", [], sample_prompts(records, n_held_out)
        )
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data).strip()
        if urllib.parse.urlparse(text).scheme in ("http", "https"):
            path = download(text, download_dir)
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                where = "a folder" if path.is_dir() else "not found"
                raise UserError(
                    f"DATA file {path} is {where}: upload your file (Files panel on the left) or fix DATA "
                    "at the top of the cell."
                )
        records = _load(path)
        return NotebookData(
            str(path),
            f"{path.name}: {len(records)} examples",
            [],
            sample_prompts(records, n_held_out),
        )
    records = _load(data)
    return NotebookData(data, f"{len(records)} examples", [], sample_prompts(records, n_held_out))


def _load(source: Any) -> list[dict]:
    from qlora_lite.data.formats import load_records

    return load_records(source)


def download(url: str, folder: str | os.PathLike, timeout: float = 60) -> Path:
    """Download `url` into `folder` once (kept by name); a missing or unreachable URL raises UserError."""
    name = Path(urllib.parse.urlparse(url).path).name or "data.jsonl"
    target = Path(folder) / name
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise UserError(
            f"DATA URL {url} answered HTTP {exc.code}: check that the link opens in a browser without signing "
            "in (on GitHub use the Raw link)."
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"DATA URL {url} cannot be reached ({reason}): check the address and the connection."
        ) from exc
    os.replace(partial, target)
    return target


def sample_prompts(records: Sequence[dict], n: int = 1) -> list[Any]:
    """Prompts from the first `n` records: each conversation up to (not including) its last answer."""
    from qlora_lite.data.formats import detect_format, to_conversations

    head = list(records[:n])
    if not head:
        return []
    spec = detect_format(head)
    if spec.task != "causal_lm":
        return []
    prompts: list[Any] = []
    for messages in to_conversations(head, spec):
        if messages and messages[0]["role"] == "text":
            continue  # plain text: there is no question to ask
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        user_only = len(context) == 1 and context[0]["role"] == "user"
        prompts.append(context[0]["content"] if user_only else context)
    return prompts


# ------------------------------------------------------------------------------------------ planning


def plan_for(model: str, data: Any, hardware: Any = None, **settings: Any):
    """The plan `train(model, data, ..., **settings)` will use, before loading a weight."""
    from qlora_lite.data.encoding import token_lengths
    from qlora_lite.model.source import resolve_model_source
    from qlora_lite.options import planner_settings
    from qlora_lite.planner.planning import plan

    knobs = planner_settings(settings)
    source = resolve_model_source(model)  # a Hub id: config.json alone, before any weight
    return plan(source, data=token_lengths(data, source), hardware=hardware, **knobs)


# ------------------------------------------------------------------------------------------ results


def show_loss_curve(run_dir: str | os.PathLike) -> Path | None:
    """Show the run's loss plot in the notebook (and return its path); None when the run has none."""
    from qlora_lite.training.record import LOSS_PLOT

    path = Path(run_dir) / LOSS_PLOT
    if not path.is_file():
        log.warning("%s has no loss plot yet: it is written when training finishes", run_dir)
        return None
    try:
        from IPython.display import Image, display
    except ImportError:
        return path
    display(Image(filename=str(path)))
    return path


def loss_table(run_dir: str | os.PathLike, every: int = 1) -> list[dict]:
    """The step log of a run: one row per optimizer step ({"step", "loss", ...}), eval rows merged in."""
    from qlora_lite.training.record import STEP_LOG

    path = Path(run_dir) / STEP_LOG
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_loss" in r or r["step"] % every == 0]


def before_after(
    run_dir: str | os.PathLike, prompts: Sequence[Any], max_new_tokens: int = 64
) -> list[dict[str, Any]]:
    """Answers of the base model (adapter switched off) and of the trained adapter, from one model load."""
    from qlora_lite.inference.generation import Generator

    generator = Generator(run_dir)
    prompts = list(prompts)
    after = generator(prompts, max_new_tokens=max_new_tokens)
    with generator.model.disable_adapter():
        before = generator(prompts, max_new_tokens=max_new_tokens)
    return [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after, strict=True)]


def format_samples(samples: Sequence[dict[str, Any]], width: int = 160) -> str:
    """Before/after samples as plain text, each answer cut to `width` characters."""

    def cut(text: str) -> str:
        flat = " ".join(str(text).split())
        return flat if len(flat) <= width else flat[: width - 3] + "..."

    lines = []
    for sample in samples:
        prompt = sample["prompt"]
        if not isinstance(prompt, str):
            prompt = prompt[-1]["content"]
        lines += [
            f"prompt: {cut(prompt)}",
            f"  before: {cut(sample['before'])}",
            f"  after:  {cut(sample['after'])}",
        ]
        if "expected" in sample:
            lines.append(f"  expected: {cut(sample['expected'])}")
    return "\n".join(lines)


def run_name(output_dir: str | os.PathLike) -> str:
    """The name of a run folder: also the name of its folder on Drive (MyDrive/qlora_lite/<name>)."""
    return Path(output_dir).expanduser().resolve().name


def is_finished(output_dir: str | os.PathLike) -> bool:
    """True when `output_dir` holds a finished run (its run record is written last)."""
    from qlora_lite.training.record import RUN_RECORD

    return (Path(output_dir).expanduser() / RUN_RECORD).is_file()


def report(result: Any, data: NotebookData, max_new_tokens: int = 64) -> None:
    """After `train()`: what was trained (or resumed), the loss curve, and held-out answers before/after."""
    if result.resumed_from_step is not None:
        print(f"resumed_from_step = {result.resumed_from_step}: continued where the last run stopped")
    m = result.metrics
    print(f"trained {m['steps']} steps: train loss {m['train_loss']}, eval loss {m['eval_loss']}, "
          f"{m['tokens_per_second']} tokens/s; adapter in {result.output_dir}")  # fmt: skip
    show_loss_curve(result.output_dir)
    if data.sample_prompts:
        samples = before_after(
            result.output_dir, data.sample_prompts, max_new_tokens=pick(max_new_tokens, 12)
        )
        for sample, row in zip(samples, data.held_out, strict=False):
            sample["expected"] = row.get("output") or row.get("completion") or row.get("answer")
        print(format_samples(samples))
