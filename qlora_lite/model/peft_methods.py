"""The PEFT methods qlora_lite trains, as a small registry: each entry builds its PEFT config and declares
what it costs (trainable parameters, activations, one-off start-up work, step-time factor).

`PeftSettings` holds every method option; `METHODS[name]` turns them into a `peft` config and into
`CostTerms`, the numbers planner/memory.py adds to its estimate. The LoRA entry covers the LoRA family:
DoRA (`lora_method='dora'`), rsLoRA, LoRA+ (two learning rates, see `parameter_groups`), rank/alpha
patterns and the initialisations of `INITS` (PiSSA, OLoRA and LoftQ are applied by model/peft_init.py).

Nothing here imports torch or peft at module level: the planner reads the cost terms from a config.json.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qlora_lite.errors import UserError

LORA_METHODS = ("lora", "dora")
TARGET_PRESETS = ("all-linear", "attention", "mlp")
# Leaf names of attention projections in planner/memory.py's ModelShape.layer_linears (everything else is MLP).
_ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense",
                     "query", "key", "value", "attention.output.dense"}  # fmt: skip


@dataclass(frozen=True)
class Init:
    """One LoRA initialisation: how PEFT names it, whether it changes the frozen base, what it computes."""

    name: str
    peft_value: Any  # LoraConfig.init_lora_weights when PEFT applies it itself
    summary: str
    mutates_base: bool = False  # the base keeps W - s*B0*A0 (PiSSA, OLoRA): saved adapters are converted
    decomposition: str | None = None  # "svd" | "qr": the one-off work at start, per target matrix


INITS = {
    i.name: i
    for i in (
        Init("default", True, "A Kaiming-uniform, B zero: the adapter starts as a no-op"),
        Init("gaussian", "gaussian", "A Gaussian (std 1/r), B zero: a no-op at start"),
        Init("pissa", "pissa", "A, B = the top-r singular vectors of W; the base keeps the residual",
             mutates_base=True, decomposition="svd"),
        Init("olora", "olora", "A, B = the first r columns of a QR of W; the base keeps the residual",
             mutates_base=True, decomposition="qr"),
        Init("loftq", True, "A, B = the top-r singular vectors of the 4-bit quantization error W - Q(W)",
             decomposition="svd"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class PeftSettings:
    """Every PEFT option of a run (the LoRA fields are ignored by the prompt-side methods)."""

    method: str = "lora"
    r: int = 16
    alpha: int | None = None  # None: 2 * r, the common choice
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    lora_method: str = "lora"
    rslora: bool = False
    init: str = "default"
    loftq_iter: int = 1
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, int] | None = None
    lora_plus_ratio: float | None = None
    num_virtual_tokens: int = 20

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, alpha or self.lora_alpha
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    @property
    def entry(self) -> PeftMethod:
        return get_method(self.method)

    def describe(self) -> str:
        """'DoRA r16 alpha 32, rsLoRA, PiSSA init' / 'prompt tuning, 20 virtual tokens'."""
        return self.entry.describe(self)

    def to_record(self) -> dict[str, Any]:
        """JSON-able; the run record, the card and `plan --json` carry it."""
        data = asdict(self)
        data["target_modules"] = (
            self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        )
        data["description"] = self.describe()
        data["peft_type"] = self.entry.peft_type
        return data

    @classmethod
    def checked(cls, value: PeftSettings | dict | None) -> PeftSettings:
        """Settings (or their record) with every problem raised as one UserError."""
        settings = value if isinstance(value, PeftSettings) else cls.from_record(value)
        problems = settings.problems()
        if problems:
            raise UserError("invalid PEFT settings: " + "; ".join(problems))
        return settings

    @classmethod
    def from_record(cls, data: dict[str, Any] | None) -> PeftSettings:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in (data or {}).items() if k in known}
        if isinstance(kwargs.get("target_modules"), list):
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)

    def problems(self) -> list[str]:
        """Every invalid combination, each with its fix (TrainConfig.validate raises them at once)."""
        out = []
        if self.method not in METHODS:
            out.append(f"peft_method {self.method!r} is not one of {', '.join(METHODS)}")
            return out
        if self.lora_method not in LORA_METHODS:
            out.append(f"lora_method {self.lora_method!r} is not one of {', '.join(LORA_METHODS)}")
        if self.init not in INITS:
            out.append(f"init_lora_weights {self.init!r} is not one of {', '.join(INITS)}")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            out.append(f"lora_plus_ratio must be > 0 (got {self.lora_plus_ratio}); 16 is the paper's choice")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            out.append(f"loftq_iter must be a positive integer (got {self.loftq_iter!r})")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            out.append(f"num_virtual_tokens must be a positive integer (got {self.num_virtual_tokens!r})")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name) or {}
            bad = [k for k, v in pattern.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            if bad:
                out.append(f"{name} values must be positive integers (bad: {', '.join(bad)})")
        out += self.entry.problems(self)
        return out


@dataclass(frozen=True)
class CostTerms:
    """What a method adds to (or removes from) the LoRA memory/time model, per the shapes it is given."""

    trainable_params: int  # updated by the optimizer (fp32 weights + grads + optimizer state)
    dropout_inputs: int = 0  # per layer: input features that get a LoRA dropout (saved for backward)
    activation_per_token_layer: float = 0.0  # extra bytes per token per layer (beyond the LoRA fit)
    virtual_tokens: int = 0  # tokens added in front of every sequence
    transient_bytes: int = 0  # largest extra buffer during a step (DoRA: a dequantized weight + B@A)
    fixed_flops_per_forward: float = 0.0  # work that does not scale with tokens (DoRA's weight norms)
    init_bytes: int = 0  # one-off memory at start (SVD/QR of the largest target matrix)
    init_flops: float = 0.0  # one-off compute at start
    gradient_checkpointing: bool = True  # False: the method cannot run under checkpointing
    notes: tuple[str, ...] = field(default=())


class PeftMethod:
    """A registry entry. Subclasses set the names and implement `peft_config` and `costs`."""

    name = ""
    peft_type = ""
    summary = ""
    uses_lora_targets = False

    def describe(self, s: PeftSettings) -> str:
        return self.summary

    def problems(self, s: PeftSettings) -> list[str]:
        return []

    def peft_config(self, s: PeftSettings, *, task_type: str, targets: Any, modules_to_save: Any) -> Any:
        raise NotImplementedError

    def costs(self, shape: Any, s: PeftSettings, targets: Sequence[Any], dbytes: int) -> CostTerms:
        raise NotImplementedError


def _rank_of(s: PeftSettings, full_name: str, pattern: dict[str, int] | None, default: int) -> int:
    """PEFT's rule: the first pattern key that matches the end of the module's name wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return value
    return default


def shape_module_name(layer_index: int, leaf: str) -> str:
    """A llama-style full module name for a ModelShape layer, to match rank/alpha patterns against."""
    parent = "self_attn" if leaf in _ATTENTION_LEAVES else "mlp"
    return f"model.layers.{layer_index}.{parent}.{leaf}"


class Lora(PeftMethod):
    name, peft_type, uses_lora_targets = "lora", "LORA", True
    summary = "LoRA: low-rank A, B beside each target Linear"

    def describe(self, s: PeftSettings) -> str:
        parts = [f"{'DoRA' if s.lora_method == 'dora' else 'LoRA'} r{s.r} alpha {s.lora_alpha}"]
        if s.rslora:
            parts.append("rsLoRA scaling alpha/sqrt(r)")
        if s.lora_plus_ratio:
            parts.append(f"LoRA+ (B at {s.lora_plus_ratio:g}x the learning rate)")
        if s.init != "default":
            parts.append(f"{s.init} init" + (f" ({s.loftq_iter} iterations)" if s.init == "loftq" else ""))
        if s.rank_pattern or s.alpha_pattern:
            parts.append("per-layer rank/alpha patterns")
        return ", ".join(parts)

    def problems(self, s: PeftSettings) -> list[str]:
        out = []
        init = INITS.get(s.init)
        if init and init.mutates_base and s.rslora and (s.rank_pattern or s.alpha_pattern):
            out.append(
                f"{s.init} init with rsLoRA and rank/alpha patterns cannot be saved as a plain LoRA adapter "
                "(PEFT cannot convert it): drop --rslora or the patterns"
            )
        return out

    def peft_config(self, s: PeftSettings, *, task_type: str, targets: Any, modules_to_save: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=s.r,
            lora_alpha=s.lora_alpha,
            lora_dropout=s.dropout,
            target_modules=targets,
            task_type=task_type,
            use_dora=s.lora_method == "dora",
            use_rslora=s.rslora,
            # PiSSA on a quantized base and LoftQ are applied by model/peft_init.py after PEFT's default init.
            init_lora_weights=INITS[s.init].peft_value,
            rank_pattern=dict(s.rank_pattern or {}),
            alpha_pattern=dict(s.alpha_pattern or {}),
            modules_to_save=modules_to_save,
        )

    def costs(self, shape: Any, s: PeftSettings, targets: Sequence[Any], dbytes: int) -> CostTerms:
        params, biggest, init_flops = 0, 0, 0.0
        dora = s.lora_method == "dora"
        for i in range(shape.num_layers):
            for layer in targets:
                r = _rank_of(s, shape_module_name(i, layer.name), s.rank_pattern, s.r)
                params += r * (layer.in_features + layer.out_features) + (layer.out_features if dora else 0)
                m, n = layer.out_features, layer.in_features
                biggest = max(biggest, m * n)
                init_flops += 4.0 * m * n * min(m, n)  # a thin SVD / QR of one m x n fp32 matrix
        notes: list[str] = []
        per_token, transient, fixed = 0.0, 0, 0.0
        if dora:
            # DoRA keeps the LoRA branch's and the base branch's outputs for the magnitude's gradient, and
            # each forward dequantizes every target weight, adds s*B@A and takes its column norms.
            per_token = sum(2 * layer.out_features * dbytes for layer in targets)
            transient = 3 * biggest * 4
            fixed = float(sum(2 * layer.out_features * layer.in_features * s.r + 3 * layer.out_features
                              * layer.in_features for layer in targets) * shape.num_layers)  # fmt: skip
            notes.append("DoRA: weight norms of every target on every forward (slower step)")
        init = INITS[s.init]
        init_bytes = 0
        if init.decomposition:
            iters = s.loftq_iter if s.init == "loftq" else 1
            init_bytes = 4 * biggest * 4  # fp32 weight, residual, U/Vh factors of the largest matrix
            notes.append(f"{s.init}: a one-off {init.decomposition.upper()} of each target matrix at start")
            if s.init == "loftq" and iters > 1:
                notes.append(
                    f"loftq: {iters} iterations re-quantize the base, so the run saves that 4-bit base "
                    "(loftq_base/) once and ships it with the adapter"
                )
        else:
            iters, init_flops = 1, 0.0
        return CostTerms(
            trainable_params=params,
            dropout_inputs=sum(layer.in_features for layer in targets) if s.dropout > 0 else 0,
            activation_per_token_layer=per_token,
            transient_bytes=transient,
            fixed_flops_per_forward=fixed,
            init_bytes=init_bytes,
            init_flops=init_flops * iters,
            notes=tuple(notes),
        )


class IA3(PeftMethod):
    name, peft_type = "ia3", "IA3"
    summary = "IA3: learned scaling vectors on attention keys/values and the MLP (tiny state)"

    def peft_config(self, s: PeftSettings, *, task_type: str, targets: Any, modules_to_save: Any) -> Any:
        from peft import IA3Config

        # PEFT's per-architecture defaults (keys, values and the MLP's down projection for llama-likes).
        return IA3Config(task_type=task_type, modules_to_save=modules_to_save)

    def costs(self, shape: Any, s: PeftSettings, targets: Sequence[Any], dbytes: int) -> CostTerms:
        # k, v (kv_dim outputs each) and the MLP's down projection (an intermediate-size input vector).
        per_layer = 2 * shape.kv_dim + shape.intermediate_size
        return CostTerms(
            trainable_params=shape.num_layers * per_layer,
            activation_per_token_layer=per_layer * dbytes,  # each scaled output is kept for its gradient
            notes=("IA3: a few thousand parameters per layer; optimizer state is negligible",),
        )


class PromptTuning(PeftMethod):
    name, peft_type = "prompt_tuning", "PROMPT_TUNING"
    summary = "prompt tuning: trainable virtual-token embeddings in front of every input"

    def describe(self, s: PeftSettings) -> str:
        return f"prompt tuning, {s.num_virtual_tokens} virtual tokens"

    def peft_config(self, s: PeftSettings, *, task_type: str, targets: Any, modules_to_save: Any) -> Any:
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=s.num_virtual_tokens)

    def costs(self, shape: Any, s: PeftSettings, targets: Sequence[Any], dbytes: int) -> CostTerms:
        return CostTerms(
            trainable_params=s.num_virtual_tokens * shape.hidden_size,
            virtual_tokens=s.num_virtual_tokens,
            notes=(f"prompt tuning: every sequence is {s.num_virtual_tokens} tokens longer",),
        )


class PrefixTuning(PeftMethod):
    name, peft_type = "prefix_tuning", "PREFIX_TUNING"
    summary = "prefix tuning: trainable keys/values prepended in every layer"

    def describe(self, s: PeftSettings) -> str:
        return f"prefix tuning, {s.num_virtual_tokens} virtual tokens per layer"

    def peft_config(self, s: PeftSettings, *, task_type: str, targets: Any, modules_to_save: Any) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=s.num_virtual_tokens)

    def costs(self, shape: Any, s: PeftSettings, targets: Sequence[Any], dbytes: int) -> CostTerms:
        return CostTerms(
            trainable_params=s.num_virtual_tokens * shape.num_layers * 2 * shape.hidden_size,
            # every query attends to the prefix too: keys/values and scores grow with it
            activation_per_token_layer=s.num_virtual_tokens * shape.num_heads * dbytes,
            gradient_checkpointing=False,
            notes=("prefix tuning: PEFT cannot combine it with gradient checkpointing",),
        )


METHODS: dict[str, PeftMethod] = {m.name: m for m in (Lora(), IA3(), PromptTuning(), PrefixTuning())}


def get_method(name: str) -> PeftMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"peft_method {name!r} is not one of {', '.join(METHODS)}") from None


def shape_targets(shape: Any, target_modules: str | Sequence[str]) -> tuple[Any, ...]:
    """The per-layer Linear layers LoRA attaches to ('all-linear': all of them, never lm_head)."""
    if isinstance(target_modules, str) and target_modules == "all-linear":
        return shape.layer_linears
    if target_modules in ("attention", "mlp"):  # presets: the attention projections, or the rest
        want = target_modules == "attention"
        return tuple(layer for layer in shape.layer_linears if (layer.name in _ATTENTION_LEAVES) == want)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = [
        layer
        for layer in shape.layer_linears
        if any(layer.name.split(".")[-1] == n or layer.name == n for n in names)
    ]
    unknown = [
        n
        for n in names
        if not any(layer.name.split(".")[-1] == n or layer.name == n for layer in shape.layer_linears)
    ]
    if unknown:
        known = ", ".join(layer.name for layer in shape.layer_linears)
        raise UserError(
            f"LoRA target modules {', '.join(unknown)} are not in this model ({shape.model_type}: {known})"
        )
    return tuple(chosen)


def preset_names(preset: str, names: Sequence[str], is_attention) -> list[str]:  # noqa: ANN001
    """The names of `names` a preset ('attention' / 'mlp') selects."""
    return [n for n in names if is_attention(n) == (preset == "attention")]


def module_targets(model: Any, preset: str | Sequence[str]) -> Any:
    """PEFT's target_modules for a preset on a loaded model: 'all-linear', or the shortest unambiguous name
    suffixes of the attention (or MLP) Linear layers of its blocks (e.g. ['q_proj', 'k_proj', ...])."""
    if not isinstance(preset, str) or preset not in ("attention", "mlp"):
        return preset if isinstance(preset, str) else list(preset)
    import torch

    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name)  # inside the repeated blocks
    ]

    def attention(name: str) -> bool:
        return bool(re.search(r"(^|\.)(\w*attn\w*|\w*attention\w*)\.", name))

    chosen = preset_names(preset, linears, attention)
    others = [n for n in linears if n not in chosen]
    suffixes: set[str] = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                suffixes.add(suffix)
                break
    if not suffixes:
        raise UserError(f"target preset {preset!r} matches no Linear layer of this model")
    return sorted(suffixes)


def parameter_groups(model: Any, lr: float, lora_plus_ratio: float | None) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one at `lr`, or with LoRA+ the B matrices at `lr * ratio` apart."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not lora_plus_ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    fast = [p for n, p in named if "lora_B" in n or "lora_embedding_B" in n]
    slow = [p for n, p in named if not ("lora_B" in n or "lora_embedding_B" in n)]
    if not fast:
        raise UserError("lora_plus_ratio needs LoRA B matrices: it applies to peft_method='lora' only")
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * lora_plus_ratio}]
