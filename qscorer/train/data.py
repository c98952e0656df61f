"""The training set and collator of the flags: single or pair items, with soft labels when a loss needs them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.datasets import PairCollator, PairDataset, SingleCollator, SingleDataset
from ..data.losses import SCORE_WEIGHTS
from ..errors import QScorerError

SOFT_LABEL_TOLERANCE = 1e-3
"""How far from 1 the sum of a soft label may be."""


class _SoftLabels:
    """Adds ``level_probs`` (five probabilities, excellent first) from the record field ``level_probs_field`` to
    every item; the field of every score record is checked when the dataset is built."""

    def __init__(self, *args, level_probs_field: str = "level_probs", **options):
        super().__init__(*args, **options)
        self.level_probs_field = level_probs_field
        for record in self.records:
            if record.task_type != "score":
                continue
            value = record.fields.get(self.level_probs_field)
            valid = (
                isinstance(value, list)
                and len(value) == len(SCORE_WEIGHTS)
                and all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0 for p in value)
                and math.isclose(sum(value), 1.0, abs_tol=SOFT_LABEL_TOLERANCE)
            )
            if not valid:
                raise QScorerError(
                    f"{record.source}: --weight_soft_kl needs {self.level_probs_field!r} = five probabilities "
                    f"(excellent first) summing to 1, got {value!r}"
                )

    def build_item(self, record, pixels):
        item = super().build_item(record, pixels)
        probs = record.fields.get(self.level_probs_field)
        item["level_probs"] = [math.nan] * len(SCORE_WEIGHTS) if probs is None else [float(p) for p in probs]
        return item


class SoftLabelSingleDataset(_SoftLabels, SingleDataset):
    """A :class:`SingleDataset` whose items carry ``level_probs``."""


class SoftLabelPairDataset(_SoftLabels, PairDataset):
    """A :class:`PairDataset` whose two items carry ``level_probs``."""


@dataclass(frozen=True)
class SoftLabelCollator(SingleCollator):
    """A :class:`SingleCollator` that also stacks the items' ``level_probs`` into a float32 [B, 5] tensor."""

    def __call__(self, instances):
        batch = super().__call__(instances)
        batch["level_probs"] = torch.tensor([instance["level_probs"] for instance in instances], dtype=torch.float32)
        return batch


def build_training_data(tokenizer, data_args, training_args, model_version: str):
    """``(dataset, collator)`` for the flags: single or pair items, with soft labels if ``--weight_soft_kl``."""
    options = dict(
        data_weights=data_args.data_weights or None,
        image_folder=data_args.image_folder,
        image_aspect_ratio=data_args.image_aspect_ratio,
        template=model_version,
        model_max_length=training_args.model_max_length,
        on_unreadable=data_args.on_unreadable,
    )
    soft = training_args.weight_soft_kl > 0
    if soft:
        options["level_probs_field"] = data_args.level_probs_field
    collator_class = SoftLabelCollator if soft else SingleCollator
    single = collator_class.from_tokenizer(tokenizer, training_args.model_max_length)
    if data_args.dataset_type == "pair":
        dataset_class = SoftLabelPairDataset if soft else PairDataset
        dataset = dataset_class(
            data_args.data_paths,
            tokenizer,
            seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
            score_field=data_args.pair_score_field,
            std_field=data_args.pair_std_field,
            **options,
        )
        return dataset, PairCollator(single)
    dataset_class = SoftLabelSingleDataset if soft else SingleDataset
    return dataset_class(data_args.data_paths, tokenizer, **options), single
