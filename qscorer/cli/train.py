"""``qscorer train``: LoRA fine-tuning with the original's flags (see ``qscorer.train.train``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of the original's train_mem.py (and of transformers' TrainingArguments)."""
    from ..train.arguments import add_flags

    add_flags(parser)


def run(args: argparse.Namespace) -> int:
    """Train with the parsed flags; ends the process group of a distributed run before returning."""
    import torch.distributed as dist

    from ..train.arguments import arguments_from_namespace
    from ..train.train import train

    try:
        train(*arguments_from_namespace(args))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
