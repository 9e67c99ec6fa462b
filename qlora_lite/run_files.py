"""The names of the files and folders in a run folder: the one place that owns them.

A run folder holds the adapter in PEFT's format (loads with plain `PeftModel.from_pretrained`), the tokenizer,
and the files below; `checkpoints/checkpoint-N/` folders each hold a manifest of what they contain.
"""

from __future__ import annotations

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's names, written by `save_pretrained`
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_RECORD = "run_record.json"  # how the run was made: base + revision, plan, data, metrics, versions
RUN_CONFIG = "run_config.json"  # the settings a run started with: `qlora-lite resume` re-runs them
STEP_LOG = "steps.jsonl"  # one row per optimizer step and per evaluation
LOSS_PLOT = "loss.png"
GENERATION_CONFIG = "generation_config.json"  # stop tokens: the model's EOS plus the template's end-of-turn
LABELS_FILE = "labels.json"  # a classifier's label mapping (the config keywords to rebuild its head)
CONFUSION_PLOT = "confusion_matrix.png"
CHECKPOINTS = "checkpoints"  # checkpoints/checkpoint-N/
MANIFEST = "manifest.json"  # inside each checkpoint: files, sizes, sha256, step
STAGING = ".staging-"  # prefix of a checkpoint being written (never read as a checkpoint)
LOCK_FILE = ".qlora-lite.lock"  # held (flock) by the process training in the folder: owner pid and host
LOFTQ_BASE = "loftq_base"  # the 4-bit base LoftQ rewrote (more than one iteration): the adapter's own base
ORIGIN_FILE = "qlora_lite_origin.json"  # {"hub_id": ...} in a model folder converted from a Hub model

# What a finished run consists of (removed together by `overwrite`).
RUN_FILES = (RUN_RECORD, RUN_CONFIG, STEP_LOG, LOSS_PLOT, ADAPTER_CONFIG, ADAPTER_WEIGHTS, GENERATION_CONFIG)
