"""Many adapters on one base loaded once: switch per request, several adapters in one batch, load/unload.

PEFT's active adapter is global state (peft #804), so nothing here relies on it: every generation passes
PEFT's per-row `adapter_names` ("__base__" for the plain base), and one lock serialises use of the model.

    adapters = AdapterSet(adapters={"orders": "runs/orders", "support": "runs/support"})
    adapters.generate(["Order: 2 apples", "My parcel is late"], ["orders", "support"])
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qlora_lite.data.encoding import ensure_chat_template
from qlora_lite.data.templates import stop_strings
from qlora_lite.errors import UserError
from qlora_lite.inference.adapter_source import AdapterSource, base_mismatch, has_tokenizer, read_adapter
from qlora_lite.inference.decoding import Completion, Prompt, TextStream, complete, eos_ids, folder_eos_ids
from qlora_lite.model.loading import load_base_model, load_tokenizer
from qlora_lite.model.source import ModelSource, resolve_model_source

log = logging.getLogger(__name__)

BASE_NAMES = (None, "base", "__base__")  # what `adapters=` may say for "the plain base"
_PEFT_BASE = "__base__"  # PEFT's own name for "no adapter on this row"

__all__ = ["AdapterSet", "Completion"]


@dataclass
class _Loaded:
    source: AdapterSource
    tokenizer: Any
    eos: list[int]
    head: Any = None  # classifiers: (score layer, label names, pad id, max length)


class AdapterSet:
    """One base model (4-bit, 8-bit or 16-bit, as the adapters were trained) and named adapters on it."""

    def __init__(
        self,
        base: str | None = None,
        adapters: Mapping[str, str] | None = None,
        *,
        revision: str | None = None,
        quantization: str | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        adapters = dict(adapters or {})
        first = read_adapter(next(iter(adapters.values()))) if adapters else None
        if base is None:
            if first is None:
                raise UserError("AdapterSet needs a base model or at least one adapter to take the base from")
            base = first.base
            if base is None:
                raise UserError(
                    f"{first.folder}: no run record or adapter_config.json names its base; pass base="
                )
        plan = first.plan if first else {}
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
        self.quantization = quantization or plan.get("quantization", "nf4")
        self.compute_dtype = compute_dtype or plan.get(
            "compute_dtype", "fp32" if accelerator == "cpu" else "bf16"
        )
        # A Hub base is pinned to a commit: the one asked for, else the one the first adapter was trained on.
        source = resolve_model_source(base, revision)
        self.base_id, self.revision = source.name, source.revision
        self._model = load_base_model(
            self.base_id, quantization=self.quantization, double_quant=plan.get("double_quant", True),
            compute_dtype=self.compute_dtype, accelerator=accelerator, revision=self.revision,
        )  # fmt: skip
        self._model.config.use_cache = True  # training turns the KV cache off; generation wants it
        self._model.eval()
        self._peft: Any = None  # the PeftModel, made when the first adapter arrives
        self.tokenizer = load_tokenizer(source)
        ensure_chat_template(self.tokenizer)
        self.context_length = int(
            getattr(self._model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        )
        self._eos = eos_ids(self._model, self.tokenizer)
        self._identity = _identity(source)
        self._adapters: dict[str, _Loaded] = {}
        self._lock = threading.RLock()
        for name, path in adapters.items():
            self.load(name, path)

    # ------------------------------------------------------------------ loading
    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    @property
    def model(self) -> Any:
        """The PeftModel holding every adapter (the plain base while none is loaded)."""
        return self._peft if self._peft is not None else self._model

    def load(self, name: str, path_or_id: str | os.PathLike, revision: str | None = None) -> None:
        """Add an adapter under `name`; refuses a taken name, another base's adapter, an unsupported task."""
        _check_name(name)
        with self._lock:
            if name in self._adapters:
                raise UserError(
                    f"an adapter named {name!r} is already loaded (from {self._adapters[name].source.source}): "
                    "unload it first or pick another name"
                )
            source = read_adapter(path_or_id, revision)
            self._check(name, source)
            tokenizer = load_tokenizer(str(source.folder)) if has_tokenizer(source.folder) else self.tokenizer
            ensure_chat_template(tokenizer)
            loaded = _Loaded(
                source, tokenizer, eos_ids(self._model, tokenizer, folder_eos_ids(source.folder))
            )
            if source.task == "classification":
                from qlora_lite.inference.adapter_heads import load_classifier_adapter

                self._peft, loaded.head = load_classifier_adapter(self._peft, self._model, name, source)
            else:
                self._load_lora(name, source)
            self._peft.eval()
            self._adapters[name] = loaded
            log.info("adapter %s loaded from %s (%s)", name, source.source, source.task)

    def _load_lora(self, name: str, source: AdapterSource) -> None:
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(source.folder), adapter_name=name)
            else:
                self._peft.load_adapter(str(source.folder), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            if self._peft is not None and name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"adapter {name!r} ({source.source}) does not fit base {self.base_id}: {first}"
            ) from exc

    def _check(self, name: str, source: AdapterSource) -> None:
        if source.config.get("peft_type", "LORA") != "LORA":
            raise UserError(
                f"adapter {name!r} ({source.source}) is a {source.config.get('peft_type')} adapter: "
                "AdapterSet serves LoRA adapters only"
            )
        if source.task not in ("causal_lm", "classification"):
            raise UserError(
                f"adapter {name!r} ({source.source}) was trained for the task {source.task!r}: AdapterSet serves "
                "causal_lm (generate) and classification (classify) adapters"
            )
        why = base_mismatch(source, self._identity)
        if why:
            raise UserError(f"adapter {name!r} ({source.source}) belongs to another base: {why}")
        trained = source.quantization
        if trained and trained != self.quantization:
            log.warning(
                "adapter %s was trained on a %s base and is served on a %s one: outputs differ slightly",
                name, trained, self.quantization,
            )  # fmt: skip

    def unload(self, name: str) -> None:
        with self._lock:
            self._get(name)
            self._peft.delete_adapter(name)
            del self._adapters[name]

    def info(self, name: str) -> dict[str, Any]:
        """Task ("causal_lm" | "classification"), source, base, rank, targets, DoRA/rsLoRA, size, labels."""
        loaded = self._get(name)
        out = {"name": name, **loaded.source.summary(), "base": self.base_id}
        if loaded.head is not None:
            out["labels"] = list(loaded.head.labels)
        return out

    def source(self, name: str) -> AdapterSource:
        """Where adapter `name` came from: its folder, PEFT config and run record."""
        return self._get(name).source

    def tokenizer_for(self, name: str | None) -> Any:
        """The tokenizer prompts for `name` are built with (its run folder's; the base's for None)."""
        return self.tokenizer if name in BASE_NAMES else self._get(name).tokenizer

    def combine(
        self,
        name: str,
        adapters: Sequence[str],
        *,
        method: str = "cat",
        weights: Sequence[float] | None = None,
        density: float | None = None,
    ) -> None:
        """Add `name`, a combination of loaded adapters (PEFT add_weighted_adapter, guarded: see combine.py)."""
        from qlora_lite.inference.combine import add_combined

        _check_name(name)
        with self._lock:
            inputs = [self._get(n) for n in adapters]
            if any(i.source.task != "causal_lm" for i in inputs):
                raise UserError("only causal_lm adapters can be combined; classifiers keep their own heads")
            add_combined(self._peft, list(adapters), name, method=method, weights=weights, density=density)
            first = inputs[0].source
            config = json.loads(json.dumps(self._peft.peft_config[name].to_dict(), default=sorted))
            source = AdapterSource(first.folder, f"{method}({', '.join(adapters)})", config, first.record)
            eos = list(dict.fromkeys(t for i in inputs for t in i.eos))
            self._adapters[name] = _Loaded(source, inputs[0].tokenizer, eos)

    def _get(self, name: str) -> _Loaded:
        if name not in self._adapters:
            loaded = ", ".join(self._adapters) or "none"
            raise UserError(f"no adapter named {name!r} is loaded (loaded: {loaded}); load it first")
        return self._adapters[name]

    # ------------------------------------------------------------------ generation
    def _rows(self, adapters: Sequence[str | None] | str | None, n: int) -> list[str | None]:
        rows = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(rows) != n:
            raise UserError(f"{len(rows)} adapter names for {n} prompts: give one per prompt, or one for all")
        out: list[str | None] = []
        for name in rows:
            if name in BASE_NAMES:
                out.append(None)
                continue
            if self._get(name).source.task != "causal_lm":
                raise UserError(f"adapter {name!r} is a classifier: use classify() for it, not generate()")
            out.append(name)
        return out

    def _generate_kwargs(self, rows: list[str | None]) -> dict[str, Any]:
        if self._peft is None:
            return {}
        dora = {n for n in rows if n and self._adapters[n].source.config.get("use_dora")}
        if dora:
            # PEFT's mixed batches refuse DoRA: such a batch must be one DoRA adapter, run as the active one.
            if len(set(rows)) > 1:
                raise UserError(f"DoRA adapter {sorted(dora)[0]!r} cannot share a batch with other adapters")
            self._peft.set_adapter(rows[0])
            return {}
        return {"adapter_names": [n or _PEFT_BASE for n in rows]}

    def generate(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[str | None] | str | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """One batch; row i goes through `adapters[i]` (None or "base": the plain base). Thread-safe."""
        prompts = list(prompts)
        if not prompts:
            return []
        options = dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed
        )
        return self._complete(prompts, self._rows(adapters, len(prompts)), **options)

    def _stops(self, rows: list[str | None], stop: Sequence[str] | None) -> list[str] | None:
        """The caller's stop strings plus each row's template end-of-turn when it is several tokens."""
        found = list(stop or [])
        for name in dict.fromkeys(rows):
            found += stop_strings(self.tokenizer_for(name))
        return list(dict.fromkeys(found)) or None

    def _complete(
        self, prompts: list[Prompt], rows: list[str | None], *, seed: int | None, stop: Any, **options: Any
    ) -> list[Completion]:
        stop = self._stops(rows, stop)
        tokenizers = [self._adapters[n].tokenizer if n else self.tokenizer for n in rows]
        # Any row's end tokens end that row; a batch stops on the union (each adapter's learned end-of-turn).
        eos = list(dict.fromkeys(self._eos + [t for n in rows if n for t in self._adapters[n].eos]))
        with self._lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            return complete(
                self.model, tokenizers, prompts, eos=eos, stop=stop, **options, **self._generate_kwargs(rows)
            )

    def stream(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Text pieces as they are generated; joined, they equal `generate([prompt], adapter)[0].text`.

        The generator returns that `Completion` (token counts, finish reason) as its StopIteration value.
        Closing it early (a streaming client went away) ends the generation at its next token."""
        rows = self._rows(adapter, 1)
        loaded = self._adapters[rows[0]] if rows[0] else None
        tokenizer = loaded.tokenizer if loaded else self.tokenizer
        pieces = TextStream(tokenizer, self._eos + (loaded.eos if loaded else []), self._stops(rows, stop))
        options = dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed
        )
        tokens: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}
        closed = threading.Event()

        def on_token(token: int) -> None:
            if closed.is_set():
                raise _StreamClosed  # stops generate() inside its loop, which releases the model's lock
            tokens.put(token)

        def work() -> None:
            try:
                result["completion"] = self._complete([prompt], rows, on_token=on_token, **options)[0]
            except _StreamClosed:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread below
                result["error"] = exc
            finally:
                tokens.put(None)

        thread = threading.Thread(target=work, name="qlora-lite-stream", daemon=True)
        thread.start()
        try:
            while (token := tokens.get()) is not None:
                piece = pieces.push(token)
                if piece:
                    yield piece
        finally:
            closed.set()  # a no-op once generation is over; else the reader left and generation stops
        thread.join()
        if "error" in result:
            raise result["error"]
        rest = pieces.finish(result["completion"].text)
        if rest:
            yield rest
        return result["completion"]

    def logits(
        self, input_ids: torch.Tensor, adapters: Sequence[str | None] | str | None = None
    ) -> torch.Tensor:
        """Next-token logits of a batch of token ids, row i through `adapters[i]` (for checks and scoring)."""
        rows = self._rows(adapters, len(input_ids))
        with self._lock, torch.no_grad():
            device = next(self.model.parameters()).device
            return self.model(input_ids=input_ids.to(device), **self._generate_kwargs(rows)).logits

    # ------------------------------------------------------------------ classification
    def classify(self, texts: Sequence[str], adapter: str) -> list[dict[str, Any]]:
        """[{"label", "probabilities": {label: p}}] from a classifier adapter trained on this base."""
        loaded = self._get(adapter)
        if loaded.head is None:
            raise UserError(
                f"adapter {adapter!r} is a {loaded.source.task} adapter, not a classifier: use generate()"
            )
        from qlora_lite.inference.adapter_heads import classify_rows

        with self._lock, torch.no_grad():
            return classify_rows(self._peft, adapter, loaded.head, loaded.tokenizer, list(texts))


class _StreamClosed(Exception):
    """Raised inside generate() by the token callback of a stream whose reader has gone."""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or name in BASE_NAMES or any(c in name for c in " /\\."):
        raise UserError(
            f"adapter name {name!r} is not usable: give a non-empty name without spaces, dots or slashes, other "
            "than 'base' (which means the plain base model)"
        )
    if (
        name in "lora_"
    ):  # PEFT finds weights by substring: such a name can reinitialise other adapters' weights
        raise UserError(f"adapter name {name!r} is part of PEFT's weight prefix 'lora_': pick a longer name")


def _identity(source: ModelSource) -> dict[str, Any]:
    """The base as run records name it (path, revision, config hash, Hub id), to compare adapters with."""
    from qlora_lite.training.record import model_identity

    identity = model_identity(source.name)
    if source.hub_id:
        identity.update(hub_id=source.hub_id, revision=source.revision or identity.get("revision"))
    return identity
