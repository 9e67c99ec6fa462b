"""Generate the Colab notebooks in colab/ from the cell sources below (outputs cleared).

    python scripts/make_notebooks.py           # write colab/*.ipynb
    python scripts/make_notebooks.py --check   # exit 1 if a notebook differs from what this script writes

Edit the cells here, not in the .ipynb files: this file is what reviewers read.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import nbformat
import tomllib

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"


def _repository() -> str:
    """The repository URL, written once in pyproject.toml ([project.urls] Repository)."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["urls"]["Repository"].rstrip("/")


REPOSITORY = _repository()  # https://github.com/OWNER/qlora_lite
GITHUB_PATH = REPOSITORY.removeprefix("https://github.com/")  # OWNER/qlora_lite: the badges' path
# The install every notebook starts with: one line. pip keeps Colab's CUDA torch (the package asks for a range
# it satisfies) and, re-run, finds the same version installed and does not reinstall it. tests/test_notebooks.py
# swaps this requirement for the checkout.
PIP_REQUIREMENT = f"qlora-lite @ git+{REPOSITORY}"
INSTALL = f'%pip install -q "{PIP_REQUIREMENT}"'
BADGE_PATH = re.compile(r"colab\.research\.google\.com/github/[^/\s]+/[^/\s]+/blob/")

COLAB_METADATA = {
    "accelerator": "GPU",  # Colab opens the notebook on a GPU runtime
    "colab": {"gpuType": "T4", "provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{GITHUB_PATH}/blob/main/colab/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


# ------------------------------------------------------------------------------------------ quickstart

QUICKSTART_CELL = (
    INSTALL
    + """

import qlora_lite  # first says whether Colab needs a restart (a library it had loaded was upgraded)
from qlora_lite import notebook

# =============== Change these, then run the cell. After a disconnect, run it again: it resumes. ===============
MODEL = "demo"  # "demo" (SmolLM2-135M-Instruct, bundled) | a Hub id, e.g. "Qwen/Qwen2.5-0.5B" | a folder
DATA = "demo"  # "demo" (shop orders -> JSON) | a Hub data set "org/name" | a .jsonl/.csv/.parquet file | URL
OUTPUT = "runs/quickstart"  # the run folder (with Drive mounted, checkpoints also go to MyDrive/qlora_lite/)
MAX_STEPS = 60  # optimizer steps
CHECKPOINT_TO = "auto"  # "auto": Google Drive if mounted | "drive": require it | "hf://you/repo": the Hub
# ==============================================================================================================

with notebook.friendly_errors():  # a mistake shows as one sentence saying what to do, not a stack trace
    setup = notebook.setup_colab(notebook.run_name(OUTPUT), CHECKPOINT_TO)
    print(setup.describe())
    data = notebook.resolve_data(DATA)
    print("data:", data.description)
    model = notebook.demo_model() if MODEL == "demo" else MODEL  # the demo's packages install only for it
    settings = notebook.train_settings(max_steps=MAX_STEPS, effective_batch_size=8, learning_rate=3e-4)
    # train() prints the plan (memory and every knob, with the reason) before it downloads or loads a weight.
    result = qlora_lite.train(model, data.source, OUTPUT, checkpoint_dir=setup.checkpoint_dir, **settings)
    notebook.report(result, data)  # loss curve, and held-out answers before and after training
"""
)


def quickstart() -> nbformat.NotebookNode:
    return [
        md(
            f"""
            # qlora_lite quickstart: fine-tune a model in one cell

            {badge("quickstart.ipynb")}

            1. **Pick a GPU**: Runtime > Change runtime type > T4 GPU (this notebook asks for one already).
            2. **Keep your work** (optional): mount Google Drive so checkpoints survive a disconnect:
               click the folder icon on the left, then the Drive icon, or run
               `from google.colab import drive; drive.mount('/content/drive')`.
            3. **Run the cell.** Its first line installs qlora_lite (keeping Colab's own CUDA torch; run again, it
               installs nothing). The cell checks the runtime, prints the memory plan, trains with a progress bar,
               and shows the loss curve and an answer before and after.

            Change `MODEL`, `DATA` and `OUTPUT` at the top of the cell: a Hub model such as
            `"Qwen/Qwen2.5-0.5B-Instruct"` and a Hub data set `"org/name"` work as they are (gated models: add your
            token as the Colab secret `HF_TOKEN`). The defaults train a small real model (SmolLM2-135M-Instruct,
            bundled, nothing to download) to turn shop orders into JSON.

            If the first output says **Restart the runtime**, pip upgraded a library Colab had already loaded:
            Runtime > Restart session, then run the cell again.

            **Disconnected?** Run the same cell again: it resumes from the newest checkpoint (on Drive when
            mounted), and a finished run is shown without training again.
            To checkpoint to the Hugging Face Hub instead, add your token as the Colab secret `HF_TOKEN`
            (key icon) and set `CHECKPOINT_TO = "hf://your-name/your-repo"`.
            """
        ),
        code(QUICKSTART_CELL),
    ]


# ------------------------------------------------------------------------------------------ python API


def python_api() -> nbformat.NotebookNode:
    return [
        md(
            f"""
            # The qlora_lite Python API, step by step

            {badge("python_api.ipynb")}

            Detect the machine, plan (and explain) a run, look at data formats, train, evaluate, generate, and
            push the adapter to the Hub. Runtime > Change runtime type > T4 GPU first (the CPU works too, slowly).
            """
        ),
        md("## Install"),
        code(INSTALL + "\n\nimport qlora_lite\nfrom qlora_lite import notebook"),
        md(
            """
            ## 1. Detect the machine
            `detect()` reads GPUs (memory, compute capability), RAM and disk once and returns a frozen
            `HardwareProfile`. bf16 is decided by compute capability (>= 8.0): a T4 trains in fp16.
            """
        ),
        code(
            """
            from qlora_lite.planner.hardware import describe

            hw = qlora_lite.detect()
            for name, value in describe(hw):
                print(f"{name:12} {value}")
            """
        ),
        md(
            """
            ## 2. Plan before loading a weight
            `plan()` predicts peak memory and picks quantization, micro-batch, accumulation, sequence length,
            gradient checkpointing and optimizer so the run fits; `explain()` says why. `hardware="t4"` plans for a
            GPU you don't have (also `"l4"`, `"a100-80gb"`, ...). Any knob can be fixed, e.g. `max_seq_length=1024`.
            """
        ),
        code(
            """
            MODEL = notebook.demo_model()  # or a Hub id ("org/name", "org/name@revision") / folder: planning reads config.json only
            print(qlora_lite.plan(MODEL).explain())
            """
        ),
        code(
            """
            t4 = qlora_lite.plan(MODEL, hardware="t4", max_seq_length=1024)
            print(t4.explain())
            print({k: t4.to_dict()[k] for k in ("quantization", "compute_dtype", "micro_batch_size",
                                                 "gradient_accumulation_steps", "peak_memory_bytes")})
            """
        ),
        md(
            """
            ## 3. Data: load and inspect formats
            Files can be JSONL, JSON, CSV or Parquet (or a list of dicts / a `datasets.Dataset`). The format is
            detected from the columns: instruction pairs (`instruction`/`input`/`output`, `prompt`/`completion`,
            `question`/`answer`), chats (`messages` with `role`/`content`, ShareGPT `conversations`) and plain
            `text`. Loss is computed on the answers only.
            """
        ),
        code(
            """
            import json
            import os

            from qlora_lite.demo import task as demo_task

            train_rows, held_out = demo_task.make_dataset(n_train=notebook.pick(480, 16), n_eval=notebook.pick(16, 2))
            os.makedirs("data", exist_ok=True)
            with open("data/orders.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\\n" for r in train_rows)

            records = qlora_lite.load_records("data/orders.jsonl")
            print(len(records), "records; first:", records[0])
            print(qlora_lite.detect_format(records))
            """
        ),
        code(
            """
            chat = [{"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]}]
            sharegpt = [{"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello!"}]}]
            for example in (chat, sharegpt, [{"prompt": "2+2=", "completion": "4"}], [{"text": "plain text"}]):
                spec = qlora_lite.detect_format(example)
                print(f"{spec.name:18} {spec.reason}")
            """
        ),
        md(
            """
            With the data, the plan knows the real sequence lengths (and how many examples a length cut would
            truncate):
            """
        ),
        code(
            """
            SETTINGS = notebook.train_settings(max_steps=60, effective_batch_size=8, learning_rate=3e-4, lora_r=16)
            print(notebook.plan_for(MODEL, "data/orders.jsonl", **SETTINGS).explain())
            """
        ),
        md(
            """
            ## 4. Train
            Checkpoints go to `<output>/checkpoints` and, when Google Drive is mounted, to
            `MyDrive/qlora_lite/<run name>`; re-running the same call resumes. The progress bar shows loss and
            tokens/s.
            """
        ),
        code(
            """
            with notebook.friendly_errors():
                setup = notebook.setup_colab("api-demo")
                print(setup.describe())
                result = qlora_lite.train(MODEL, "data/orders.jsonl", "runs/api-demo",
                                          checkpoint_dir=setup.checkpoint_dir, **SETTINGS)
            notebook.show_loss_curve(result.output_dir)
            print(result.metrics)
            """
        ),
        md(
            """
            ## 5. Evaluate
            The eval loss comes from the held-out split `train()` kept aside (`eval_fraction`). For this task the
            telling number is exact match on orders the model never saw: parse the answer as JSON and compare.
            The same loaded model answers with the adapter switched off, which is the base model.
            """
        ),
        code(
            """
            print("eval loss:", result.metrics["eval_loss"], " perplexity:", result.metrics["eval_perplexity"])

            generator = qlora_lite.Generator(result.output_dir)
            prompts = [demo_task.prompt_for(r) for r in held_out]
            new_tokens = notebook.pick(48, 12)
            after = generator(prompts, max_new_tokens=new_tokens)
            with generator.model.disable_adapter():
                before = generator(prompts, max_new_tokens=new_tokens)
            for name, answers in (("base model", before), ("fine-tuned", after)):
                correct = sum(demo_task.is_correct(a, r) for a, r in zip(answers, held_out, strict=True))
                print(f"{name:11} exact match {correct}/{len(held_out)}")
            """
        ),
        md(
            """
            ## 6. Generate
            A `Generator` keeps the model loaded for many prompts; `qlora_lite.generate(prompt, adapter=run_dir)`
            is the one-shot form. Prompts can be text or a chat (a list of `{"role", "content"}` messages).
            """
        ),
        code(
            """
            print(generator("Extract the order as JSON.\\n\\nPlease send 3 blue mugs to Oslo, express.",
                            max_new_tokens=new_tokens))
            print(generator([{"role": "system", "content": "Answer with JSON only."},
                             {"role": "user", "content": "Extract the order as JSON.\\n\\nTwo red lamps to Lima, standard."}],
                            max_new_tokens=new_tokens))
            """
        ),
        md(
            """
            ## 7. Push to the Hugging Face Hub
            Add a token with write access as the Colab secret `HF_TOKEN` (key icon in the left bar, notebook
            access on) and set `HUB_REPO`. The push uploads the adapter, tokenizer, run record and a model card;
            the token stays in the environment and is never written into the files.
            """
        ),
        code(
            """
            HUB_REPO = ""  # e.g. "your-name/smollm2-orders-lora"

            if not HUB_REPO:
                print("skipping the push: set HUB_REPO above to push the adapter to the Hub")
            elif notebook.hub_token() is None:
                print("skipping the push: no Hugging Face token; add the Colab secret HF_TOKEN (key icon) or set HF_TOKEN")
            else:
                from qlora_lite.hub import push as hub

                with notebook.friendly_errors():
                    print(hub.push(result.output_dir, HUB_REPO))
            """
        ),
    ]


# ------------------------------------------------------------------------------------------ resume


def resume() -> nbformat.NotebookNode:
    return [
        md(
            f"""
            # Never lose work: disconnects, checkpoints and resuming

            {badge("resume.ipynb")}

            **What happens on a disconnect.** Colab gives no warning: the VM and its disk vanish. qlora_lite saves
            a checkpoint (adapter, optimizer, scheduler, RNG and data position) every few minutes — the plan picks
            the interval, at most 10 minutes; `save_every_minutes=` / `save_every_steps=` change it — so a
            disconnect costs at most that interval.

            **Where checkpoints live.**
            - `<output>/checkpoints/checkpoint-<step>`: on the VM's disk, gone with the VM.
            - The durable copy: `MyDrive/qlora_lite/<run name>` when Google Drive is mounted, or the folder you pass
              as `checkpoint_dir=`, or the Hub with `checkpoint_dir="hf://you/repo"` (needs `HF_TOKEN`). Each copy
              is verified file by file before it counts.

            **How to resume.** Run the same cell again. `train()` finds the newest checkpoint that verifies (local
            or durable), checks it belongs to the same run, and continues exactly where it stopped; a finished run
            is returned without training.
            """
        ),
        md("## Install"),
        code(INSTALL + "\n\nimport qlora_lite\nfrom qlora_lite import notebook"),
        md(
            """
            ## Mount Google Drive
            On Colab, mount Drive first (folder icon > Drive icon, or
            `from google.colab import drive; drive.mount('/content/drive')`). Without it the demo below still
            runs, with local checkpoints only.
            """
        ),
        code(
            """
            import shutil

            OUTPUT = "runs/resume-demo"
            with notebook.friendly_errors():
                setup = notebook.setup_colab("resume-demo")
            print(setup.describe())

            MODEL = notebook.demo_model()
            data = notebook.resolve_data("demo", n_train=notebook.pick(480, 16))
            SETTINGS = notebook.train_settings(max_steps=notebook.pick(20, 3), effective_batch_size=8,
                                               learning_rate=3e-4, lora_r=16, save_every_steps=1)
            STOP_AT = max(1, SETTINGS["max_steps"] // 2)
            """
        ),
        md(
            """
            ## A real interruption
            A callback raises `KeyboardInterrupt` after step `STOP_AT`, as the stop button does. `train()` saves a
            checkpoint on the way out (and copies it to Drive), then re-raises.
            """
        ),
        code(
            """
            class StopAt:
                def __init__(self, step):
                    self.step = step

                def on_step_end(self, state):
                    if state.step == self.step:
                        raise KeyboardInterrupt


            try:
                qlora_lite.train(MODEL, data.source, OUTPUT, checkpoint_dir=setup.checkpoint_dir,
                                 callbacks=[StopAt(STOP_AT)], overwrite=True, **SETTINGS)
            except KeyboardInterrupt:
                print(f"interrupted after step {STOP_AT}; a checkpoint was saved")
            """
        ),
        md(
            """
            ## List runs and checkpoints
            `qlora_lite.checkpoint.runs.list_runs(folder)` (or `qlora-lite runs FOLDER` in a terminal) shows each run with its
            newest checkpoint that verifies. It works on a Drive folder too, after the VM is gone.
            """
        ),
        code(
            """
            from qlora_lite.checkpoint.runs import format_runs, list_runs

            print(format_runs(list_runs("runs")))
            if setup.checkpoint_dir and not setup.checkpoint_dir.startswith("hf://"):
                print("\\non the durable copy:")
                print(format_runs(list_runs(setup.checkpoint_dir)))
            """
        ),
        code("!qlora-lite runs runs"),
        md(
            """
            ## Resume, even on a fresh machine
            A new VM starts with an empty disk. Below, the local run folder is deleted to show it: with Drive
            mounted, `train()` restores the newest checkpoint from Drive. Without Drive, the local checkpoint is
            kept and used. Either way it is the same call as before.
            """
        ),
        code(
            """
            if setup.checkpoint_dir:
                shutil.rmtree(OUTPUT)
                print(f"deleted {OUTPUT}, as a new VM would not have it")
            result = qlora_lite.train(MODEL, data.source, OUTPUT, checkpoint_dir=setup.checkpoint_dir, **SETTINGS)
            print(f"resumed_from_step = {result.resumed_from_step}; finished at step {result.metrics['steps']}")
            """
        ),
        md(
            """
            Running the same call once more returns the finished run without training:
            """
        ),
        code(
            """
            again = qlora_lite.train(MODEL, data.source, OUTPUT, checkpoint_dir=setup.checkpoint_dir, **SETTINGS)
            print("steps:", again.metrics["steps"], "- nothing was retrained")
            """
        ),
        md(
            """
            ## On another machine
            - **From Drive:** mount the same Drive, then run the same `train(...)` call with the same `OUTPUT` name
              (the Drive folder is `MyDrive/qlora_lite/<name of OUTPUT>`), or pass `checkpoint_dir=` explicitly.
              In a terminal: `qlora-lite resume runs/resume-demo` re-runs a run from its saved settings.
            - **From the Hub:** train with `checkpoint_dir="hf://you/your-run-checkpoints"` and `HF_TOKEN` set; on
              the other machine, set the token and run the same call.
            - `resume="never"` starts afresh; `overwrite=True` replaces the run and its durable checkpoints;
              `resume="force"` continues even if settings changed.
            """
        ),
    ]


# ------------------------------------------------------------------------------------------ adapters


def adapters() -> nbformat.NotebookNode:
    return [
        md(
            f"""
            # Many adapters on one base: switch, route, merge

            {badge("adapters.ipynb")}

            Train two small adapters on SmolLM2-135M-Instruct (orders -> JSON, dates -> ISO), load both on one
            base loaded once, answer a batch where every row uses its own adapter, pick the adapter per request
            with a router, check what serving stacks accept, and merge one adapter into a plain model.
            Runtime > Change runtime type > T4 GPU first (the CPU works too, slowly).
            """
        ),
        md("## Install"),
        code(INSTALL),
        code(
            """
            import json
            import os

            import qlora_lite
            from qlora_lite import notebook
            from qlora_lite.demo import dates, task

            MODEL = notebook.demo_model()
            SETTINGS = notebook.train_settings(max_steps=60, effective_batch_size=8, learning_rate=3e-4, lora_r=16)
            """
        ),
        md(
            """
            ## 1. Two adapters, two tasks
            Each run keeps a sample of its training prompts in its run record: the router uses it later.
            """
        ),
        code(
            """
            RUNS, HELD_OUT = {}, {}
            os.makedirs("data", exist_ok=True)


            def train_task(name, module):
                rows, HELD_OUT[name] = module.make_dataset(n_train=notebook.pick(480, 16), n_eval=notebook.pick(8, 2))
                with open(f"data/{name}.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\\n" for r in rows)
                with notebook.friendly_errors():
                    RUNS[name] = qlora_lite.train(MODEL, f"data/{name}.jsonl", f"runs/{name}", **SETTINGS).output_dir
                print(name, "->", RUNS[name])
            """
        ),
        code('train_task("orders", task)'),
        code('train_task("dates", dates)'),
        md(
            """
            ## 2. One base, both adapters, switched per row
            `AdapterSet` loads the base once (quantized as the adapters were trained) and answers each row of a
            batch with its own adapter (`None` or `"base"`: the plain base). Nothing is reloaded to switch.
            """
        ),
        code(
            """
            adapters = qlora_lite.AdapterSet(adapters=RUNS)
            print(adapters.names, adapters.info("dates")["rank"], adapters.quantization)

            prompts = [task.prompt_for(HELD_OUT["orders"][0]), dates.prompt_for(HELD_OUT["dates"][0])]
            new_tokens = notebook.pick(48, 8)
            for row in adapters.generate(prompts * 2, ["orders", "dates", None, None], max_new_tokens=new_tokens):
                print(row.finish_reason, row.completion_tokens, repr(row.text))
            """
        ),
        code(
            """
            for name, module in (("orders", task), ("dates", dates)):
                rows = HELD_OUT[name]
                for who in (name, None):
                    answers = adapters.generate([module.prompt_for(r) for r in rows], who, max_new_tokens=new_tokens)
                    correct = sum(module.is_correct(a.text, r) for a, r in zip(answers, rows, strict=True))
                    print(f"{name:7} with {who or 'the base':7}: exact match {correct}/{len(rows)}")
            """
        ),
        md("Streaming gives the same text piece by piece:"),
        code(
            """
            print("".join(adapters.stream(prompts[1], "dates", max_new_tokens=new_tokens)))
            """
        ),
        md(
            """
            ## 3. Route each request to its adapter
            The router compares a request with each run's own training prompts (TF-IDF centroids); off-topic
            requests, or ones too close to call, go to the base. It is one JSON file.
            """
        ),
        code(
            """
            router = qlora_lite.Router.from_adapters(RUNS)
            for text in (prompts[0], prompts[1], "Write a haiku about autumn."):
                print(router.route(text))
            held = [(task.prompt_for(r), "orders") for r in HELD_OUT["orders"]]
            held += [(dates.prompt_for(r), "dates") for r in HELD_OUT["dates"]] + [("Tell me a joke.", None)]
            print(router.evaluate(held))
            router.save("runs/router.json")
            """
        ),
        md(
            """
            ## 4. What serving stacks accept
            Rank, targets, size, and whether vLLM's LoRA serving and llama.cpp's LoRA conversion take the adapter
            (`qlora-lite adapters inspect RUN` on the command line).
            """
        ),
        code(
            """
            from qlora_lite.inference.portability import adapter_report, format_report

            print(format_report(adapter_report(RUNS["orders"])))
            """
        ),
        md(
            """
            ## 5. Merge one adapter into a plain model
            The adapter was trained against the 4-bit base, so the merge dequantizes exactly those weights,
            merges, and saves 16-bit; merged and unmerged logits are compared and the difference recorded
            (`qlora-lite merge RUN --output DIR`). The folder loads with plain transformers.
            """
        ),
        code(
            """
            from transformers import AutoModelForCausalLM, AutoTokenizer

            with notebook.friendly_errors():
                merged = qlora_lite.merge_adapter(RUNS["dates"], "merged/dates", dtype="fp32")
            print("max logit difference vs base + adapter:", merged.max_abs_diff)
            model = AutoModelForCausalLM.from_pretrained("merged/dates")
            tokenizer = AutoTokenizer.from_pretrained("merged/dates")
            chat = tokenizer.apply_chat_template([{"role": "user", "content": prompts[1]}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
            out = model.generate(**chat, max_new_tokens=new_tokens, do_sample=False)
            print(tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))
            """
        ),
    ]


NOTEBOOKS = {
    "quickstart.ipynb": quickstart,
    "python_api.ipynb": python_api,
    "resume.ipynb": resume,
    "adapters.ipynb": adapters,
}


def _ruff() -> str | None:
    beside = Path(sys.executable).with_name("ruff")
    return str(beside) if beside.is_file() else shutil.which("ruff")


def ruff_format(text: str) -> str:
    """The notebook as `ruff format` (the repo's settings) leaves it, so `ruff format --check .` passes."""
    ruff = _ruff()
    if ruff is None:
        sys.stderr.write("ruff not found: writing the cells unformatted\n")
        return text
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "notebook.ipynb"
        path.write_text(text)
        config = ["--config", str(ROOT / "pyproject.toml")]
        subprocess.run([ruff, "format", "--quiet", *config, str(path)], check=True, env=_no_cache())
        return path.read_text()


def _no_cache() -> dict[str, str]:
    return {**os.environ, "RUFF_NO_CACHE": "true"}


def build(name: str) -> str:
    nb = nbformat.v4.new_notebook(cells=NOTEBOOKS[name](), metadata=COLAB_METADATA)
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem}-{index}"  # stable ids: regenerating changes nothing
    nbformat.validate(nb)
    return ruff_format(nbformat.writes(nb) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if colab/*.ipynb are out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path, text = COLAB / name, build(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for readme in (ROOT / "README.md", COLAB / "README.md"):  # their badge links name the same repository
        text = readme.read_text()
        fixed = BADGE_PATH.sub(f"colab.research.google.com/github/{GITHUB_PATH}/blob/", text)
        fixed = fixed.replace(
            '"qlora-lite @ git+https://github.com/OWNER/qlora_lite"', f'"{PIP_REQUIREMENT}"'
        )
        if fixed != text:
            if args.check:
                stale.append(readme.relative_to(ROOT).as_posix())
            else:
                readme.write_text(fixed)
    if stale:
        sys.stderr.write(f"out of date: {', '.join(stale)}; run python scripts/make_notebooks.py\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
