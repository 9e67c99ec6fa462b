"""Several ranks (torchrun, gloo on CPU) train exactly what one process trains; rank 0 alone writes.

The end-to-end tests run the tiny llama in 4-bit NF4 (bitsandbytes works under gloo on CPU) with LoRA dropout
0: dropout masks depend on how examples are batched, so only a dropout-free run can equal one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from models_util import write_jsonl
from safetensors.torch import load_file

from qlora_lite.checkpoint.store import CheckpointStore
from qlora_lite.errors import UserError
from qlora_lite.planner.choices import step_seconds
from qlora_lite.planner.hardware import GpuInfo
from qlora_lite.planner.memory import estimate_memory, model_shape
from qlora_lite.planner.planning import plan
from qlora_lite.planner.profiles import get_profile
from qlora_lite.training import distributed as dp

WORKER = str(Path(__file__).with_name("train_worker.py"))
ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(23)]
# 21 training examples after the eval split; effective batch 4 -> 6 steps per epoch, the last one short (1
# example: rank 1 idles in it). 8 steps cross the epoch boundary.
SETTINGS = dict(
    max_steps=8, effective_batch_size=4, micro_batch_size=2, lora_r=4, seed=3, lora_dropout=0.0,
    save_every_steps=3, sample_generations=0, quantization="nf4",
    packing=False,  # the kill/OOM points count one padded micro-batch of 2 examples per forward call
)  # fmt: skip
LLAMA_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
)  # fmt: skip
LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}


# ------------------------------------------------------------------------------------------ pure parts


def test_each_step_is_split_into_disjoint_balanced_shares():
    lengths = [5, 40, 12, 33, 7, 21, 18, 2]
    indices = [6, 1, 3, 0, 7, 2]
    shares = [dp.rank_share(indices, lengths, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(indices)
    assert not set(shares[0]) & set(shares[1])
    tokens = [sum(lengths[i] for i in share) for share in shares]
    assert abs(tokens[0] - tokens[1]) <= max(lengths[i] for i in indices) // 2 + 10
    assert dp.rank_share([4], lengths, 1, 2) == []  # a short last step leaves a rank without examples


def test_ranks_come_from_the_launcher_environment():
    assert dp.ranks_from_environment({}) == dp.Ranks()
    ranks = dp.ranks_from_environment(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size, ranks.is_main) == (
        3,
        4,
        1,
        2,
        False,
    )
    with pytest.raises(UserError, match="RANK=4"):
        dp.ranks_from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_rank_plans_for_its_own_device():
    two_t4 = replace(
        get_profile("t4"),
        gpus=(
            GpuInfo(0, "Tesla T4", 15 << 30, 15 << 30, (7, 5)),
            GpuInfo(1, "Tesla T4", 14 << 30, 14 << 30, (7, 5)),
        ),
        usable_memory_override_bytes=None,
    )
    second = dp.rank_hardware(two_t4, dp.Ranks(rank=1, world_size=2, local_rank=1, local_world_size=2))
    assert [g.index for g in second.gpus] == [1] and second.usable_memory_bytes == 14 << 30
    cpu = get_profile("cpu")
    half = dp.rank_hardware(cpu, dp.Ranks(rank=0, world_size=2, local_rank=0, local_world_size=2))
    assert half.usable_memory_bytes == cpu.usable_memory_bytes // 2  # the ranks share the host's RAM
    assert dp.rank_hardware(cpu, dp.Ranks()) is cpu


def test_step_seeds_depend_only_on_seed_step_and_rank():
    assert dp.step_seed(3, 7, 1) == dp.step_seed(3, 7, 1)
    assert (
        len({dp.step_seed(3, 7, 0), dp.step_seed(3, 7, 1), dp.step_seed(3, 8, 0), dp.step_seed(4, 7, 0)}) == 4
    )


def test_launcher_arguments():
    argv = ["train", "--gpus", "2", "--model", "m", "--gpus=3", "--max-steps", "5"]
    assert dp.without_flag(argv, "--gpus") == ["train", "--model", "m", "--max-steps", "5"]
    command = dp.torchrun_command(2, ["train", "--model", "m"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and command[-4:] == ["qlora_lite", "train", "--model", "m"]


def test_more_ranks_than_examples_per_step_is_refused():
    with pytest.raises(UserError, match="at most 4"):
        dp.check_world_size(4, dp.Ranks(rank=0, world_size=8), None)
    dp.check_world_size(4, dp.Ranks(rank=0, world_size=2), saved_world_size=1)  # re-split: allowed


def test_plan_keeps_the_effective_batch_across_ranks():
    for world in (1, 2, 3, 4):
        p = plan(LLAMA_8B, data=[400] * 100, hardware="a100-80gb", effective_batch_size=16, world_size=world)
        assert p.fits and p.effective_batch_size == 16 and p.world_size == world
        assert p.micro_batch_size * p.gradient_accumulation_steps * world >= 16
        assert p.micro_batch_size * (p.gradient_accumulation_steps - 1) * world < 16  # no extra micro-batch
    fixed = plan(
        LLAMA_8B, hardware="a100-80gb", micro_batch_size=2, gradient_accumulation_steps=4, world_size=2
    )
    assert fixed.effective_batch_size == 16 and "world_size" not in fixed.fixed
    assert fixed.to_dict()["world_size"] == 2


def test_throughput_assumes_speed_up_only_for_the_devices_used():
    shape = model_shape(LLAMA_8B)
    one = get_profile("a100-80gb")
    eight = replace(one, gpus=tuple(replace(one.gpus[0], index=i) for i in range(8)))
    single = step_seconds(shape, one, 16 * 512, False, "causal_lm")
    assert step_seconds(shape, eight, 16 * 512, False, "causal_lm") == single  # one process uses one GPU
    assert step_seconds(shape, eight, 16 * 512, False, "causal_lm", world_size=2) == pytest.approx(single / 2)
    cpu = get_profile("cpu")  # CPU ranks share the cores: no speed-up
    assert step_seconds(shape, cpu, 512, False, "causal_lm", world_size=2) == step_seconds(
        shape, cpu, 512, False, "causal_lm"
    )


def test_fsdp_shards_the_weights_so_a_70b_base_fits_on_eight_gpus():
    knobs = dict(compute_dtype="bf16", micro_batch_size=1, seq_len=1024, gradient_checkpointing=True)
    replica = estimate_memory(LLAMA_70B, world_size=8, **knobs)
    sharded = estimate_memory(LLAMA_70B, world_size=8, fsdp=True, **knobs)
    assert replica.peak_bytes > 40 * 2**30  # 4-bit 70B does not fit a 40 GB GPU as a replica
    assert sharded.breakdown["base_linear_weights"] == pytest.approx(
        replica.breakdown["base_linear_weights"] / 8, rel=1e-6
    )
    assert sharded.breakdown["quant_state"] == replica.breakdown["quant_state"]  # stays whole on each device
    assert sharded.breakdown["activations"] == replica.breakdown["activations"]
    assert 0 < sharded.breakdown["fsdp_gathered_blocks"] < replica.breakdown["base_linear_weights"] / 20
    assert sharded.peak_bytes < 40 * 2**30
    p = plan(LLAMA_70B, data=[1000] * 50, hardware="a100-40gb", world_size=8, fsdp=True)
    assert p.fits and p.fsdp and "FSDP" in p.explain()
    assert not plan(LLAMA_70B, data=[1000] * 50, hardware="a100-40gb", world_size=8).fits


# ------------------------------------------------------------------------------- two real gloo ranks


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_training(out: Path, reference: Path, tolerance: float) -> None:
    got, want = losses(out), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, SETTINGS["max_steps"] + 1))
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= tolerance, f"step {step}: loss {a} vs {b}"
    a, b = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= tolerance, key


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data"), ROWS)


@pytest.fixture(scope="module")
def one_process(tiny_model, data_file, tmp_path_factory) -> Path:
    import qlora_lite

    out = tmp_path_factory.mktemp("one") / "run"
    qlora_lite.train(tiny_model, data_file, str(out), progress=False, **SETTINGS)
    return out


def cli_flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def run_ranks(
    tiny_model, data_file, out, settings, processes: int = 2, **kill
) -> subprocess.CompletedProcess:
    """The worker under torchrun with `processes` ranks (1: the worker alone, without torchrun)."""
    job = {"model": tiny_model, "data": data_file, "out": str(out), "settings": settings, **kill}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [sys.executable, *(launcher if processes > 1 else []), WORKER, json.dumps(job)]
    return subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)


def train_command(tiny_model, data_file, out) -> list[str]:
    return ["train", "--model", tiny_model, "--data", data_file, "--output", str(out), "--no-progress",
            *cli_flags(SETTINGS)]  # fmt: skip


@pytest.fixture(scope="module")
def killed_and_relaunched(tiny_model, data_file, tmp_path_factory) -> tuple[Path, Path, int]:
    """Rank 1 runs out of memory in step 2 (and backs off alone), is SIGKILLed inside step 5, and the job is
    re-launched with `qlora-lite train --gpus 2`.

    Returns (the relaunched run, a copy of the run as the kill left it, the step it resumes from).
    """
    root = tmp_path_factory.mktemp("killed")
    out, left = root / "run", root / "as-left"
    # Rank 1's training forwards: 1 probe; step 1: #2 (its 2 of 4 examples as one micro-batch of 2); step 2:
    # #3 runs out of memory -> its micro-batch halves to 1 and the step is redone as #4, #5; steps 3, 4: two
    # each (#6-#9); #10 is the first of step 5: killed there. Rank 0 cannot finish step 5 without rank 1,
    # so its last checkpoint is step 3 (or 4 if it saves on the way out when torchrun stops it).
    settings = {**SETTINGS, "progress": False}
    killed = run_ranks(
        tiny_model, data_file, out, settings, kill_at_forward=10, oom_at_forward=[3], kill_rank=1
    )
    assert killed.returncode != 0
    assert "out of memory at micro-batch 2: retrying this step at 1" in killed.stderr  # rank 1, alone
    latest = CheckpointStore(out / "checkpoints").latest()
    assert latest is not None and latest.step in (3, 4)
    assert not (out / "run_record.json").exists()
    shutil.copytree(out, left)
    command = [
        sys.executable,
        "-m",
        "qlora_lite",
        "train",
        "--gpus",
        "2",
        *train_command(tiny_model, data_file, out)[1:],
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.distributed.run" in proc.stderr and "rank 0 of 2 (gloo)" in proc.stderr
    printed = json.loads(proc.stdout[proc.stdout.index("{") :])  # one answer (from rank 0), not one per rank
    assert printed["resumed_from_step"] == latest.step and printed["steps"] == SETTINGS["max_steps"]
    return out, left, latest.step


def test_a_killed_rank_and_a_relaunch_end_like_one_process(one_process, killed_and_relaunched):
    out, _, _ = killed_and_relaunched
    assert_same_training(out, one_process, 1e-5)
    record = json.loads((out / "run_record.json").read_text())
    assert record["world_size"] == 2 and record["plan"]["world_size"] == 2
    assert record["plan"]["effective_batch_size"] == 4 and record["plan"]["gradient_accumulation_steps"] == 1
    assert json.loads((one_process / "run_record.json").read_text())["world_size"] == 1
    # Rank 1's out-of-memory backoff in step 2 changed nothing: rank 0 kept micro-batch 2 and logged it.
    assert {
        r["micro_batch_size"]
        for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())
        if "loss" in r
    } == {2}
    # One writer: one row per step, one set of checkpoints (every 3 steps and the last; 2 kept).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-000006",
        "checkpoint-000008",
    ]


def test_a_two_rank_checkpoint_resumes_in_one_process(one_process, killed_and_relaunched):
    """Another world size re-splits each step's examples: the effective batch and the result stay."""
    import qlora_lite

    _, left, step = killed_and_relaunched
    saved = json.loads((left / "run_config.json").read_text())
    result = qlora_lite.train(saved["model"], saved["data"], str(left), progress=False, **SETTINGS)
    assert result.resumed_from_step == step
    assert_same_training(left, one_process, 1e-5)
    assert json.loads((left / "run_record.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_same_world_size_resumes_bit_for_bit_under_torchrun_and_accelerate(
    tiny_model, data_file, one_process, tmp_path
):
    """Uninterrupted ranks under torchrun and under `accelerate launch` train the very same bits, and a rank
    killed (without any out-of-memory split) and re-launched on the same world size ends on them too."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "qlora_lite",
    ]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                  "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0", "-m", "qlora_lite"]  # fmt: skip
    for name, launcher in (("torchrun", torchrun), ("accelerate", accelerate)):
        out = tmp_path / name
        proc = subprocess.run([*launcher, *train_command(tiny_model, data_file, out)], capture_output=True, text=True,
                              env=environment(), timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads((out / "run_record.json").read_text())["world_size"] == 2
    assert_same_training(tmp_path / "accelerate", tmp_path / "torchrun", 0.0)
    assert_same_training(tmp_path / "torchrun", one_process, 1e-5)
    out = tmp_path / "killed"
    settings = {**SETTINGS, "progress": False}
    # Rank 1: 1 probe forward, then one micro-batch of 2 per step: forward 6 is step 5.
    assert run_ranks(tiny_model, data_file, out, settings, kill_at_forward=6, kill_rank=1).returncode != 0
    assert CheckpointStore(out / "checkpoints").latest().step in (3, 4)
    resumed = run_ranks(tiny_model, data_file, out, settings)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] in (3, 4)
    assert_same_training(out, tmp_path / "torchrun", 0.0)


def test_loftq_iterations_under_torchrun_write_one_base_and_resume_on_it(tiny_model, data_file, tmp_path):
    """LoftQ past one iteration rewrites the 4-bit base: rank 0 saves it, every rank trains on the same base,
    and a relaunch after a killed rank puts the saved base back on both ranks (model/loftq_base.py)."""
    settings = {
        **SETTINGS,
        "max_steps": 4,
        "save_every_steps": 2,
        "init_lora_weights": "loftq",
        "loftq_iter": 3,
    }
    one = tmp_path / "one"
    assert run_ranks(tiny_model, data_file, one, settings, processes=1).returncode == 0
    out = tmp_path / "ranks"
    # rank 1's training forwards: 1 probe, then one per step: #4 is step 3, after the checkpoint of step 2
    killed = run_ranks(tiny_model, data_file, out, settings, kill_at_forward=4, kill_rank=1)
    assert killed.returncode != 0 and CheckpointStore(out / "checkpoints").latest().step == 2
    saved = (out / "loftq_base" / "model.safetensors").read_bytes()
    assert saved == (one / "loftq_base" / "model.safetensors").read_bytes()
    relaunched = run_ranks(tiny_model, data_file, out, settings)
    assert relaunched.returncode == 0, relaunched.stderr[-4000:]
    assert (out / "loftq_base" / "model.safetensors").read_bytes() == saved
    got, want = losses(out), losses(one)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(got, want, strict=True)), (got, want)
