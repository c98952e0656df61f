"""Training runs on CPU: learning in 30 steps, reproducibility, bf16, the CLI, and the multi-process launches
(torchrun with gloo; DeepSpeed ZeRO-2 through scripts/train_lora.sh). Multi-process tests check what each run
leaves behind (steps, world size, a checkpoint that loads and scores), not only the exit status, because torch's
gloo can abort at interpreter exit after a successful run."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_support import SCRIPTS, demo_base_model, synthetic_data, training_argv

from qscorer.cli import main
from qscorer.loading import load_pretrained_model
from qscorer.scoring import Scorer
from qscorer.train.arguments import parse_arguments
from qscorer.train.train import train

FINISHED = "training finished after"


def _train(output_dir, *extra):
    return train(*parse_arguments(training_argv(output_dir, *extra)))


def test_loss_falls_by_half_in_30_steps(tmp_path):
    run = _train(tmp_path, "--max_steps", "30", "--learning_rate", "1e-2", "--per_device_train_batch_size", "4")
    losses = run.losses
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.5 * first, losses
    assert run.model.get_base_model().model.gradient_checkpointing


def test_two_runs_with_one_seed_give_the_same_losses(tmp_path):
    first = _train(tmp_path / "a", "--max_steps", "4", "--seed", "7")
    second = _train(tmp_path / "b", "--max_steps", "4", "--seed", "7")
    other = _train(tmp_path / "c", "--max_steps", "4", "--seed", "8")
    assert first.losses == second.losses and first.losses != other.losses
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value)


def test_bf16_run_on_cpu_saves_a_loadable_checkpoint(tmp_path):
    run = _train(tmp_path, "--max_steps", "2", "--bf16", "True", "--use_cpu", "True")
    assert all(math.isfinite(loss) for loss in run.losses)
    non_lora = torch.load(tmp_path / "non_lora_trainables.bin", weights_only=True)
    assert non_lora["base_model.model.deepmlp.output_layer.weight"].dtype == torch.float32
    assert non_lora["base_model.model.model.embed_tokens.weight"].dtype == torch.bfloat16
    tokenizer, model, _, _ = load_pretrained_model(tmp_path, demo_base_model(), device="cpu", dtype="float32")
    assert all(math.isfinite(score) for score in Scorer.from_model(model, tokenizer, clamp=False)(_images(2)))


def test_bf16_pair_run_reads_the_score_logits(tmp_path):
    run = _train(tmp_path, "--max_steps", "1", "--bf16", "True", "--use_cpu", "True", "--dataset_type", "pair",
                 "--pair_std_field", "std", "--weight_soft_kl", "0.5")
    entry = run.trainer.state.log_history[0]
    assert all(math.isfinite(entry[name]) for name in ("loss", "loss_rank", "loss_soft_kl_A", "loss_score_B"))


def test_cli_trains_and_returns_zero(tmp_path, caplog):
    caplog.set_level("INFO", logger="qscorer")
    assert main(["train", *training_argv(tmp_path, "--max_steps", "1")]) == 0
    assert (tmp_path / "adapter_model.bin").is_file()
    assert any(FINISHED in record.getMessage() for record in caplog.records)


def _images(count):
    return sorted((synthetic_data() / "images").glob("test_*"))[:count]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict:
    # transformers 4.57 writes ACCELERATE_* settings (e.g. mixed precision) into this process's environment; a
    # launched run must not inherit those of an earlier in-process test.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    return {**inherited, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(_free_port())}


def _check_distributed_output(result, output_dir, steps, per_device_batch):
    """The run's own evidence: rank 0 finished and saved; two processes shared the data; the checkpoint scores."""
    log = result.stdout + result.stderr
    assert FINISHED in log, log[-3000:]
    if result.returncode != 0:
        assert "Traceback" not in log.split(FINISHED, 1)[1], log[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    dataset_size = len(json.loads((synthetic_data() / "metas" / "train.json").read_text()))
    assert state["log_history"][0]["epoch"] == pytest.approx(2 * per_device_batch / dataset_size, abs=1e-3)
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert args.world_size == 2
    tokenizer, model, _, _ = load_pretrained_model(output_dir, demo_base_model(), device="cpu", dtype="float32")
    assert all(math.isfinite(score) for score in Scorer.from_model(model, tokenizer, clamp=False)(_images(2)))
    return state, args


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_with_pair_losses(tmp_path):
    flags = training_argv(
        tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "2", "--dataset_type", "pair",
        "--pair_std_field", "std", "--weight_soft_kl", "0.5", "--use_fix_std", "False",
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "qscorer", "train", *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=300)
    state, args = _check_distributed_output(result, tmp_path, steps=3, per_device_batch=2)
    assert not args.deepspeed
    assert all("loss_rank" in entry and "loss_soft_kl_A" in entry for entry in state["log_history"] if "loss" in entry)


def _deepspeed_extensions_dir() -> str:
    """A JIT-build folder for DeepSpeed's CPU op owned by this environment. Environments sharing torch's default
    folder rebuild the op for each other's flags, and a build killed half-way leaves a lock that every later run
    waits on forever; a lock older than any build here is such a leftover and is removed."""
    folder = Path(sys.prefix) / "torch_extensions"
    for lock in folder.glob("*/lock"):
        if time.time() - lock.stat().st_mtime > 300:
            lock.unlink()
    return str(folder)


@pytest.mark.slow
def test_train_lora_sh_runs_deepspeed_zero2_on_two_cpu_processes(tmp_path):
    data = synthetic_data()
    environment = {
        **_environment(),
        "TORCH_EXTENSIONS_DIR": _deepspeed_extensions_dir(),
        "BASE_MODEL": str(demo_base_model()),
        "DATA_ROOT": str(data),
        "META": str(data / "metas" / "train.json"),
        "OUTPUT_DIR": str(tmp_path),
        "LAUNCHER": "torchrun",
        "PYTHON": sys.executable,
    }
    # The script's GPU settings (bf16, tf32, tensorboard, 4 workers) replaced for this CPU-only machine.
    overrides = ["--bf16", "False", "--tf32", "False", "--report_to", "none", "--dataloader_num_workers", "0",
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--lora_r", "8", "--lora_alpha", "16"]
    result = subprocess.run(["bash", str(SCRIPTS / "train_lora.sh"), "0,1", *overrides], capture_output=True,
                            text=True, env=environment, timeout=600)
    state, args = _check_distributed_output(result, tmp_path, steps=2, per_device_batch=2)
    assert args.deepspeed == str(SCRIPTS / "zero2.json") and args.weight_next_token == 0.05
    assert "deepspeed" in (result.stdout + result.stderr).lower()
    first = state["log_history"][0]
    assert first["loss"] == pytest.approx(0.05 * first["loss_score"], rel=0.5)
