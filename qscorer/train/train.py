"""LoRA fine-tuning of Q-Scorer with the original's flags (the re-implementation of train_mem.py).

Usage (one process, or under ``torchrun`` / the ``deepspeed`` launcher with ``--no_local_rank``)::

    qscorer train --model_name_or_path mplug-owl2-llama2-7b --version v1 --lora_enable True \\
        --data_paths metas/train_koniq_7k2.json --data_weights 1 --image_folder data/ \\
        --image_aspect_ratio pad --output_dir checkpoints/qscorer_lora [--deepspeed scripts/zero2.json ...]

``scripts/train_lora.sh`` carries the original's values. ``--resume_from_checkpoint`` takes a checkpoint folder or
``last`` (the newest ``checkpoint-*`` in ``--output_dir``). The output folder is a LoRA checkpoint that
``qscorer score --model-path OUT --model-base BASE`` and the original loader read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import QScorerError

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = ("last", "true", "True")


@dataclass
class TrainingRun:
    """What :func:`train` returns: the trainer (its model, state and log history) and the tokenizer."""

    trainer: object
    tokenizer: object

    @property
    def model(self):
        return self.trainer.model

    @property
    def losses(self) -> list[float]:
        """The logged training losses, in order."""
        return [entry["loss"] for entry in self.trainer.state.log_history if "loss" in entry]


def _resume_checkpoint(training_args) -> str | None:
    requested = training_args.resume_from_checkpoint
    if requested is None or requested not in LAST_CHECKPOINT:
        return requested
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(training_args.output_dir) if training_args.output_dir else None
    if last is None:
        raise QScorerError(
            f"--resume_from_checkpoint {requested}: no checkpoint-* folder in {training_args.output_dir}"
        )
    return last


def train(model_args, data_args, training_args) -> TrainingRun:
    """Build the model and data of the flags, train, and save the result into ``--output_dir``."""
    from transformers import set_seed

    from ..checkpoints import unwrap_peft
    from .data import build_training_data
    from .setup import build_model, load_training_tokenizer
    from .trainer import QScorerTrainer

    if training_args.process_index != 0:
        logging.getLogger("qscorer").setLevel(logging.WARNING)
    resume = _resume_checkpoint(training_args)
    set_seed(training_args.seed)
    tokenizer = load_training_tokenizer(model_args, training_args)
    model = build_model(model_args, data_args, training_args, tokenizer)
    dataset, collator = build_training_data(tokenizer, data_args, training_args, model_args.version)
    trainer = QScorerTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, tokenizer=tokenizer
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    unwrap_peft(trainer.model).config.use_cache = True
    trainer.save_model(training_args.output_dir)
    logger.info("training finished after %d steps; saved to %s", trainer.state.global_step, training_args.output_dir)
    return TrainingRun(trainer, tokenizer)
