"""Shared material of the training tests (no tests here): a tiny base model folder with the demo tokenizer, a small
synthetic IQA set, and the command lines that train on them. Built once per test session, in a temporary folder."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from tiny import tiny_config

from qscorer.data import build_demo_tokenizer
from qscorer.data.demo_tokenizer import DEMO_VOCAB_SIZE
from qscorer.data.synthetic import build_synthetic_iqa
from qscorer.train.setup import write_base_model

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@functools.cache
def _workspace() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qscorer-train-tests-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def base_config(vocab_size: int = DEMO_VOCAB_SIZE):
    """The tiny config (tests/tiny.py) as a base model: no score tokens yet, the tokenizer's vocabulary size."""
    return tiny_config(vocab_size=vocab_size, score_token_id=[], score_tokens=[])


@functools.cache
def demo_base_model() -> Path:
    """A random tiny base model folder with the demo tokenizer (512 pieces)."""
    tokenizer = build_demo_tokenizer(_workspace() / "demo_tokenizer")
    return write_base_model(_workspace() / "demo_base", base_config(), tokenizer, seed=0)


@functools.cache
def synthetic_data() -> Path:
    """A synthetic IQA set: 32 train and 8 test images of 64 px (metas/train.json, train_levels.json, test.json)."""
    root = _workspace() / "synthetic"
    build_synthetic_iqa(root, num_train=32, num_test=8, image_size=64, seed=0, progress=False)
    return root


def training_argv(output_dir, *extra, base=None, data=None, meta="train.json") -> list[str]:
    """Flags of a short LoRA run on the synthetic set (train_lora.sh's choices, tiny sizes); ``extra`` overrides."""
    base = base or demo_base_model()
    data = data or synthetic_data()
    flags = f"""
        --model_name_or_path {base} --version v1 --lora_enable True --lora_r 8 --lora_alpha 16
        --data_paths {data}/metas/{meta} --image_folder {data} --image_aspect_ratio pad
        --output_dir {output_dir} --per_device_train_batch_size 4 --max_steps 2 --learning_rate 1e-3
        --logging_steps 1 --save_strategy no --report_to none --tune_visual_abstractor True
        --freeze_vision_model False --group_by_modality_length True --gradient_checkpointing True
        --dataloader_num_workers 0 --seed 0
    """
    return flags.split() + [str(value) for value in extra]


def script_flags() -> list[str]:
    """The ``qscorer train`` flags of scripts/train_lora.sh, with its environment variables as placeholders."""
    import shlex

    text = (SCRIPTS / "train_lora.sh").read_text()
    command = text[text.index('"${launch[@]}" train') :].replace("\\\n", " ")
    words = shlex.split(command, posix=True)
    return words[2 : words.index("$@")]
