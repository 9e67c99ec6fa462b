"""Combine LoRA adapters into a new one through PEFT's `add_weighted_adapter`, with the guards PEFT lacks.

PEFT computes some combinations wrongly without a word (peft #3761, #3737): the new adapter gets
`lora_alpha = r` and no `rank_pattern`, so rsLoRA scaling, per-module ranks/alphas and DoRA magnitudes are
lost, and a name that already exists is silently left as it was. Those inputs are refused here, each with
its reason, before PEFT is called.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("cat", "linear", "svd", "ties", "dare_ties")
SAME_RANK = ("linear", "ties", "dare_ties")  # PEFT stacks these per rank: every input needs the same r
DEFAULT_DENSITY = 0.5  # ties / dare_ties: the fraction of each update kept


def combine_problems(
    configs: Mapping[str, Mapping[str, Any]], method: str, new_name: str, existing: Sequence[str]
) -> list[str]:
    """Every reason `configs` (name -> adapter_config dict) cannot be combined by `method` into `new_name`."""
    problems = []
    if method not in METHODS:
        problems.append(f"method {method!r} is not one of {', '.join(METHODS)}")
    if new_name in existing:
        problems.append(
            f"an adapter named {new_name!r} already exists (PEFT would silently keep the old one)"
        )
    if len(configs) < 2:
        problems.append("give at least two adapters to combine")
    for name, cfg in configs.items():
        if cfg.get("peft_type", "LORA") != "LORA":
            problems.append(f"{name} is a {cfg.get('peft_type')} adapter, not LoRA")
        if cfg.get("use_dora"):
            problems.append(
                f"{name} uses DoRA: its magnitude vectors are not combined (the result would be wrong)"
            )
        if cfg.get("use_rslora"):
            problems.append(
                f"{name} uses rsLoRA scaling (alpha/sqrt(r)), which the combined adapter would lose"
            )
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            problems.append(
                f"{name} has per-module ranks or alphas (rank_pattern), which PEFT combines wrongly"
            )
        if cfg.get("modules_to_save"):
            problems.append(
                f"{name} trains whole modules ({cfg['modules_to_save']}), which cannot be combined"
            )
    ranks = {name: cfg.get("r") for name, cfg in configs.items()}
    if method in SAME_RANK and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
        problems.append(f"{method!r} needs one rank for all adapters ({listed}): use 'cat' or 'svd'")
    kinds = {isinstance(cfg.get("target_modules"), str) for cfg in configs.values()}
    if len(kinds) > 1:
        problems.append(
            "some adapters name target modules by a pattern and others by a list: PEFT refuses the mix"
        )
    return problems


def add_combined(
    peft: Any,
    names: Sequence[str],
    new_name: str,
    *,
    method: str = "cat",
    weights: Sequence[float] | None = None,
    density: float | None = None,
) -> None:
    """Add `new_name` to `peft` (a PeftModel holding `names`), after checking every guard."""
    weights = list(weights) if weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise UserError(f"{len(weights)} weights for {len(names)} adapters: give one weight per adapter")
    configs = {n: peft.peft_config[n].to_dict() for n in names}
    problems = combine_problems(configs, method, new_name, list(peft.peft_config))
    if problems:
        raise UserError("cannot combine " + ", ".join(names) + ": " + "; ".join(problems))
    kwargs: dict[str, Any] = {}
    if method in ("ties", "dare_ties"):
        kwargs["density"] = DEFAULT_DENSITY if density is None else density
    peft.add_weighted_adapter(list(names), weights, new_name, combination_type=method, **kwargs)
    peft.eval()
    log.info("combined %s into %s (%s, weights %s)", ", ".join(names), new_name, method, weights)
