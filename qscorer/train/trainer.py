"""``QScorerTrainer``: the transformers Trainer with the original's sampler and parameter groups,
qscorer's batch objective, and checkpoints in the original's LoRA format.

- Sampler: :class:`~qscorer.train.sampler.ModalityLengthGroupedSampler` with ``--group_by_modality_length``.
- Optimizer: weight decay on every parameter outside LayerNorm / RMSNorm modules whose name lacks "bias";
  ``--visual_abstractor_lr`` gives the abstractor's parameters their own learning rate (the original matched the
  wrong substring and ignored the flag).
- Loss: :class:`~qscorer.train.objectives.BatchObjective`; its unweighted parts are averaged between two logging
  steps and logged beside the loss.
- Saving: with LoRA, every checkpoint (intermediate and final) is a LoRA checkpoint folder of
  :mod:`qscorer.train.saving` plus the tokenizer and the image-processor config, and resuming reads it back.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from ..checkpoints import ADAPTER_CONFIG, is_peft_model, unwrap_peft
from ..data.conversation import level_word_ids
from ..model.llama import MPLUGOwl2RMSNorm
from .objectives import BatchObjective
from .sampler import ModalityLengthGroupedSampler
from .saving import load_lora_checkpoint, save_lora_checkpoint

logger = logging.getLogger(__name__)

NORM_MODULES = (nn.LayerNorm, MPLUGOwl2RMSNorm)
ABSTRACTOR = "visual_abstractor"
TRAINING_ARGS_FILE = "training_args.bin"


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: outside norm modules and without "bias" in the name."""
    in_norms = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, NORM_MODULES)
        for name, _ in module.named_parameters(recurse=False)
    }
    return {name for name, _ in model.named_parameters() if name not in in_norms and "bias" not in name}


def parameter_groups(model: nn.Module, weight_decay: float, visual_abstractor_lr: float | None) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters (empty groups left out).

    Without ``visual_abstractor_lr``: decayed / not decayed. With it: the same split for the rest and for the
    abstractor, whose two groups get ``lr = visual_abstractor_lr``.
    """
    decay = decay_parameter_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            in_abstractor = visual_abstractor_lr is not None and ABSTRACTOR in name
            groups[(in_abstractor, name in decay)].append(parameter)
    result = []
    for (in_abstractor, decayed), parameters in sorted(groups.items()):
        group = {"params": parameters, "weight_decay": weight_decay if decayed else 0.0}
        if in_abstractor:
            group["lr"] = visual_abstractor_lr
        result.append(group)
    return result


class QScorerTrainer(Trainer):
    """The Trainer of ``qscorer train``; ``tokenizer`` is saved with every checkpoint."""

    def __init__(self, *args, tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean that does not use num_items_in_batch: let the Trainer scale it for
        # gradient accumulation (PeftModel.forward takes **kwargs, which would make the Trainer assume otherwise).
        self.model_accepts_loss_kwargs = False
        self.tokenizer_to_save = tokenizer
        config = unwrap_peft(self.model).config
        level_words = config.objective("rating_tokens") == "level_words"
        self.objective = BatchObjective(config, level_word_ids(tokenizer) if level_words else None)
        self._part_sums: dict[str, float] = defaultdict(float)
        self._part_counts: dict[str, int] = defaultdict(int)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths,
            batch_size=self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.args.weight_decay, self.args.visual_abstractor_lr)
            optimizer_class, options = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_class(groups, **options)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self.objective(model, inputs)
        for name, value in result.parts.items():
            self._part_sums[name] += float(value.detach())
            self._part_counts[name] += 1
        return (result.loss, result) if return_outputs else result.loss

    def log(self, logs, *args, **kwargs):
        """Adds the averaged loss parts; a NaN or infinite value (a diverging run) is logged as null with a warning,
        so that ``trainer_state.json`` stays strict JSON."""
        if "loss" in logs:
            for name, total in self._part_sums.items():
                logs[name] = round(total / self._part_counts[name], 6)
            self._part_sums.clear()
            self._part_counts.clear()
        non_finite = [key for key, value in logs.items() if isinstance(value, float) and not math.isfinite(value)]
        if non_finite:
            logger.warning("step %d: %s not finite, logged as null", self.state.global_step, ", ".join(
                f"{key} = {logs[key]}" for key in non_finite))
            logs = {key: None if key in non_finite else value for key, value in logs.items()}
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        from ..data.tokenization import save_tokenizer
        from ..model.image_processing import ImageProcessor

        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if is_peft_model(self.model):
            if state_dict is not None and not state_dict:
                logger.warning("no gathered weights to save in %s (DeepSpeed keeps its own checkpoint)", output_dir)
            else:
                save_lora_checkpoint(self.model, output_dir, state_dict=state_dict,
                                     safe_serialization=self.args.save_safetensors)
        else:
            use_cache, self.model.config.use_cache = self.model.config.use_cache, True
            self.model.save_pretrained(output_dir, state_dict=state_dict)
            self.model.config.use_cache = use_cache
            logger.info("saved the full model to %s", output_dir)
        if self.tokenizer_to_save is not None:
            save_tokenizer(self.tokenizer_to_save, output_dir)
        ImageProcessor().save_pretrained(output_dir)
        torch.save(self.args, output_dir / TRAINING_ARGS_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if is_peft_model(model) and os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_CONFIG)):
            logger.info("resuming from the LoRA checkpoint %s", resume_from_checkpoint)
            load_lora_checkpoint(model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
