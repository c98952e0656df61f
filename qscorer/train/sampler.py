"""The modality-length grouped sampler of ``--group_by_modality_length``, as in the original.

Lengths are signed: positive for records with an image, negative for text-only ones. Indices are shuffled, cut into
megabatches of ``world_size * batch_size``, each megabatch sorted by length (longest first) and dealt to
``world_size`` chunks of similar total length; with both signs present, image and text-only records form separate
megabatches, shuffled together, and the two leftover partial megabatches are merged and appended last.

Unlike the original (global torch RNG), the permutation comes from a generator seeded with ``seed + epoch``, so an
epoch's order does not depend on what else consumed random numbers, and a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal ``indices`` (longest first) into ``num_chunks`` chunks of equal size, each next index to the chunk with
    the smallest total length so far; a count not divisible by ``num_chunks`` is split with a stride instead."""
    if len(indices) % num_chunks != 0:
        return [list(indices[start::num_chunks]) for start in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator) -> list[int]:
    """Indices of records whose lengths all have one sign, grouped as described in the module docstring."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = [indices[start : start + size] for start in range(0, len(indices), size)]
    ordered = []
    for megabatch in megabatches:
        megabatch = sorted(megabatch, key=lambda index: lengths[index], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            ordered.extend(chunk)
    return ordered


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator) -> list[int]:
    """Indices for signed ``lengths`` (image records positive, text-only negative)."""
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    image_indices = [index for index, length in enumerate(lengths) if length > 0]
    text_indices = [index for index, length in enumerate(lengths) if length < 0]
    image_order = [image_indices[i] for i in
                   length_grouped_indices([lengths[i] for i in image_indices], batch_size, world_size, generator)]
    text_order = [text_indices[i] for i in
                  length_grouped_indices([-lengths[i] for i in text_indices], batch_size, world_size, generator)]
    size = world_size * batch_size
    image_megabatches = [image_order[start : start + size] for start in range(0, len(image_order), size)]
    text_megabatches = [text_order[start : start + size] for start in range(0, len(text_order), size)]
    leftover = image_megabatches[-1] + text_megabatches[-1]
    megabatches = image_megabatches[:-1] + text_megabatches[:-1]
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[position] for position in order]
    if leftover:
        megabatches.append(sorted(leftover))
    return [index for megabatch in megabatches for index in megabatch]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields :func:`modality_length_grouped_indices` of ``lengths``; ``set_epoch`` (called by the Trainer's data
    loader) draws a new order per epoch, deterministically from ``seed``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int = 0):
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (positive: with image, negative: text only)")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
