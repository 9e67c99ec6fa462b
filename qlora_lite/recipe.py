"""YAML recipes: every training option as a key, with the Hugging Face / TRL / Axolotl names as aliases.

    # recipe.yaml
    model: HuggingFaceTB/SmolLM2-135M-Instruct
    data: train.jsonl
    output_dir: runs/my-run
    num_train_epochs: 2              # = epochs
    per_device_train_batch_size: 4   # = micro_batch_size
    load_in_4bit: true               # = quantization: nf4

`load_recipe(path)` returns {option name: value}; command-line flags and keyword arguments override it. A key
that is neither an option nor an alias is an error naming the file, the line and the closest known key.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError

# Where things are (not options of the run itself, but keys a recipe may hold).
PLACES = ("model", "data", "output_dir")


def _flag(option: str, when_true: Any) -> Callable[[Any, str], dict[str, Any]]:
    """An HF boolean that switches an option to a value (`bf16: true` -> compute_dtype bf16)."""

    def convert(value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return {option: when_true} if value else {}

    return convert


def _quant_type(value: Any, where: str) -> dict[str, Any]:
    if value != "nf4":
        raise UserError(f"{where}: only nf4 4-bit quantization is supported (got {value!r}); use nf4")
    return {"quantization": "nf4"}


_HF_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch",
    "adamw_hf": "adamw_torch",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
}


def _optim(value: Any, where: str) -> dict[str, Any]:
    if value not in _HF_OPTIMIZERS:
        raise UserError(f"{where}: optimizer {value!r} is not one of {', '.join(_HF_OPTIMIZERS)}")
    return {"optimizer": _HF_OPTIMIZERS[value]}


def _renamed(option: str) -> Callable[[Any, str], dict[str, Any]]:
    return lambda value, where: {option: value}


# Names that translate a value (an HF boolean or optimizer name); plain renames come from each option's
# `aliases` in qlora_lite.options, where the option is declared.
TRANSLATED: dict[str, Callable[[Any, str], dict[str, Any]]] = {
    "model_name_or_path": _renamed("model"),
    "base_model": _renamed("model"),  # Axolotl
    "dataset": _renamed("data"),
    "optim": _optim,
    "bf16": _flag("compute_dtype", "bf16"),
    "fp16": _flag("compute_dtype", "fp16"),
    "load_in_4bit": _flag("quantization", "nf4"),
    "load_in_8bit": _flag("quantization", "int8"),
    "bnb_4bit_quant_type": _quant_type,
    "use_dora": _flag("lora_method", "dora"),  # PEFT / Axolotl (peft_use_dora)
    "peft_use_dora": _flag("lora_method", "dora"),
}


def aliases() -> dict[str, Callable[[Any, str], dict[str, Any]]]:
    """Every name a recipe may use besides the option names: declared aliases plus the translated ones."""
    from qlora_lite.options import OPTIONS

    declared = {alias: _renamed(o.name) for o in OPTIONS for alias in o.recipe_names}
    return {**declared, **TRANSLATED}


def _key_lines(text: str) -> dict[str, int]:
    """Top-level key -> its 1-based line in the YAML text (for messages that point at the line)."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None or not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """(mapping, key -> line) of a recipe file; every problem is a UserError naming the file (and line)."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency
        raise UserError("recipes need PyYAML: pip install pyyaml") from exc
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"recipe {file} not found: check the path given to --config")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"recipe {file} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file} line {mark.line + 1}" if mark else str(file)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{file}: a recipe is a mapping of option: value, got a {type(data).__name__}")
    return data, lines


def load_recipe(path: str | os.PathLike, known: Iterable[str] | None = None) -> dict[str, Any]:
    """{option: value} from a recipe, aliases translated; `known`: the option names the command takes
    (default: every option)."""
    from qlora_lite.options import OPTIONS

    data, lines = read_yaml(path)
    known = set(known if known is not None else (o.name for o in OPTIONS)) | set(PLACES)
    table = aliases()
    options: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in data.items():
        where = f"{path} line {lines.get(key, '?')}"
        key_text = str(key)
        if key_text in known:
            found = {key_text: value}
        elif key_text in table:
            found = table[key_text](value, f"{where} ({key_text})")
        else:
            close = difflib.get_close_matches(key_text, sorted(known | set(table)), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {key_text!r}{hint}")
        for option, converted in found.items():
            if option in options and options[option] != converted:
                raise UserError(
                    f"{where}: {key_text!r} sets {option} to {converted!r}, but {origin[option]} already set it "
                    f"to {options[option]!r}: keep one of them"
                )
            options[option] = converted
            origin[option] = f"{key_text!r} (line {lines.get(key, '?')})"
    return options


def apply_recipe(
    path: str | os.PathLike | None, places: Mapping[str, Any], explicit: Mapping[str, Any], command: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(places, settings) for `command` ("train", "plan", "train-classifier"): the recipe at `path` (if any)
    under what was given explicitly. Recipe values are checked, each problem naming the file and key; a
    training recipe plans as it is (plan ignores its training-only keys)."""
    from qlora_lite.options import for_command
    from qlora_lite.options import problems as option_problems

    recipe = load_recipe(path) if path else {}
    applies = {o.name for o in for_command(command)}
    settings = {k: v for k, v in recipe.items() if k not in PLACES}
    other = sorted(set(settings) - applies)
    if other and command != "plan":
        raise UserError(f"{path}: {', '.join(other)} does not apply to `qlora-lite {command}`")
    settings = {k: v for k, v in settings.items() if k in applies}
    found = option_problems(settings, {name: f"{path}: {name}" for name in settings})
    if found:
        raise UserError("; ".join(found))
    merged_places = {k: (v if v is not None else recipe.get(k)) for k, v in places.items()}
    return merged_places, merge(settings, explicit)


def merge(recipe: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's options overridden by what was given explicitly (flags, keyword arguments)."""
    return {**recipe, **{k: v for k, v in explicit.items() if v is not None}}


def dump_recipe(options: Mapping[str, Any]) -> str:
    """An effective configuration as a recipe (YAML), keys sorted, ready for `--config`."""
    import yaml

    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items()) if v is not None}
    return yaml.safe_dump(plain, sort_keys=True, allow_unicode=True)
