"""Meta records -> model inputs: prompt ids, label masking, the single and pair datasets and their collators.

Meta files are JSON lists or JSON lines of records ``{"image", "conversations", "gt_score",
"task_type"}``; ``data_paths`` are mixed with integer ``data_weights`` (each meta's records repeated weight times).
Every record is validated when the meta is loaded; errors name the file and the record index.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..constants import DEFAULT_IMAGE_TOKEN
from ..errors import QScorerError
from ..model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, NUM_VISUAL_TOKENS
from ..model.image_processing import UnreadableImageError, load_image, process_images, to_rgb
from .conversation import (
    GPT,
    HUMAN,
    TRAINING_VERSIONS,
    V1,
    ConversationTemplate,
    build_training_prompt,
    get_template,
    place_images_first,
)
from .records import read_json_records
from .tokenization import encode_text, score_token_ids, tokenizer_image_token

logger = logging.getLogger(__name__)

SCORE_TASK = "score"
DESCRIPTION_TASK = "description"
TASK_TYPES = (SCORE_TASK, DESCRIPTION_TASK)
UNREADABLE_POLICIES = ("error", "skip")
"""What a dataset does with an image it cannot read: "error" stops with a QScorerError naming the file; "skip" logs
a warning and uses the next readable record instead (deterministic). The original silently used a random record."""
VIDEO_EXTENSION = ".mp4"


def load_video_frames(path: str | os.PathLike) -> list[Image.Image]:
    """RGB frames of a video sampled at one frame per second, like the original.

    Frame indices are ``int(fps * i)`` for ``i`` in ``range(int(n_frames / fps))``, with fps the stream's average
    rate. Needs PyAV (``pip install 'qscorer[video]'``).
    """
    try:
        import av
    except ImportError:
        raise QScorerError(
            f"reading the video {path} needs PyAV: install the optional extra with pip install 'qscorer[video]'"
        ) from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise UnreadableImageError(f"video {path} has no frame rate")
            fps = float(rate)
            candidates: dict[int, Image.Image] = {}
            next_second = 0
            n_frames = 0
            for frame in container.decode(stream):
                if n_frames == int(fps * next_second):
                    candidates[next_second] = frame.to_image()
                    next_second += 1
                n_frames += 1
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(f"video file not found: {path}") from None
    except Exception as error:
        # FFmpeg errors, and whatever else a damaged or hostile file makes the demuxer or decoder raise.
        raise UnreadableImageError(f"cannot read video {path}: {type(error).__name__}: {error}") from error
    frames = [candidates[second] for second in range(int(n_frames / fps))]
    if not frames:
        raise UnreadableImageError(f"video {path} is shorter than one second: no frame to sample at 1 fps")
    return [to_rgb(frame) for frame in frames]


def mask_targets(prompt: str, input_ids: Sequence[int], tokenizer, *, template: ConversationTemplate = V1,
                 model_max_length: int | None = None, source: str = "record") -> list[int]:
    """Labels of a v1 training prompt, masked like the original: only the answers (with their "</s>") stay supervised.

    Rounds are the prompt split on "</s>"; in each, the instruction (up to " ASSISTANT: ") is masked using the ids
    lengths of the round and instruction encoded alone, as the original does. If the count does not reach the length
    of ``input_ids`` (and is below ``model_max_length``), everything is masked and a warning names ``source``.
    """
    if model_max_length is None:
        model_max_length = tokenizer.model_max_length
    has_image = DEFAULT_IMAGE_TOKEN in prompt
    labels = list(input_ids)
    separator = template.answer_separator
    position = 2
    labels[:position] = [IGNORE_INDEX] * min(position, len(labels))
    for round_text in prompt.split(template.sep2):
        if not round_text:
            break
        parts = round_text.split(separator)
        if len(parts) != 2:
            break
        instruction = parts[0] + separator
        if has_image:
            round_length = len(tokenizer_image_token(round_text, tokenizer)) - 1
            instruction_length = len(tokenizer_image_token(instruction, tokenizer)) - 3
        else:
            round_length = len(encode_text(round_text, tokenizer)) - 1
            instruction_length = len(encode_text(instruction, tokenizer)) - 2
        end = min(position + instruction_length, len(labels))
        labels[position:end] = [IGNORE_INDEX] * max(end - position, 0)
        position += round_length
    labels[position:] = [IGNORE_INDEX] * max(len(labels) - position, 0)
    # The original counted ids != pad id (0); a literal "<unk>" in the text (id 0) then caused a false mismatch.
    if position < model_max_length and position != len(input_ids):
        logger.warning("%s: tokenization mismatch (%d vs %d ids); the sample is fully masked", source, position,
                       len(input_ids))
        labels = [IGNORE_INDEX] * len(labels)
    return labels


def preprocess(conversations: Sequence[Mapping], tokenizer, *, n_images: int = 1,
               template: ConversationTemplate = V1, model_max_length: int | None = None,
               source: str = "record") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a record's conversations.

    With images, the placeholders move to the front of the human turn (one per image, :func:`place_images_first`),
    the prompt is rendered with the v1 template and encoded with one -200 per placeholder.
    """
    messages = place_images_first(conversations, n_images) if n_images else list(conversations)
    prompt = build_training_prompt(messages, template)
    if n_images:
        input_ids = tokenizer_image_token(prompt, tokenizer)
    else:
        input_ids = encode_text(prompt, tokenizer)
    labels = mask_targets(prompt, input_ids, tokenizer, template=template, model_max_length=model_max_length,
                          source=source)
    return input_ids, labels


@dataclass(frozen=True)
class MetaRecord:
    """One validated meta record; ``source`` ("<file> record <index>") names it in messages."""

    source: str
    images: tuple[str, ...]
    is_video: bool
    conversations: tuple[Mapping, ...]
    task_type: str
    gt_score: float | None
    fields: Mapping

    @property
    def word_count(self) -> int:
        """Whitespace-separated words of all conversation values (the grouped sampler's length)."""
        return sum(len(message["value"].split()) for message in self.conversations)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_record(raw, path: str | os.PathLike, index: int) -> MetaRecord:
    """Validate one raw record of meta ``path`` (position ``index``); errors name both."""
    source = f"{path} record {index}"
    if not isinstance(raw, dict):
        raise QScorerError(f"{source}: a record must be a JSON object, got {type(raw).__name__}")
    if "image" not in raw:
        raise QScorerError(f"{source}: no 'image' (every training record needs an image path)")
    image = raw["image"]
    if isinstance(image, str) and image:
        images = (image,)
    elif isinstance(image, list) and image and all(isinstance(item, str) and item for item in image):
        images = tuple(image)
    else:
        raise QScorerError(f"{source}: 'image' must be a path or a non-empty list of paths, got {image!r}")
    is_video = isinstance(image, str) and image.lower().endswith(VIDEO_EXTENSION)
    conversations = _parse_conversations(raw.get("conversations"), source)
    task_type = raw.get("task_type", SCORE_TASK)
    if task_type not in TASK_TYPES:
        raise QScorerError(f"{source}: unknown task_type {task_type!r}; choose one of {list(TASK_TYPES)}")
    gt_score = raw.get("gt_score")
    if gt_score is None and task_type == SCORE_TASK:
        raise QScorerError(f"{source}: a score record needs a numeric 'gt_score'")
    if gt_score is not None and not _number(gt_score):
        raise QScorerError(f"{source}: 'gt_score' must be a finite number, got {gt_score!r}")
    return MetaRecord(source, images, is_video, conversations, task_type,
                      None if gt_score is None else float(gt_score), raw)


def _parse_conversations(conversations, source: str) -> tuple[Mapping, ...]:
    if not isinstance(conversations, list) or not conversations:
        raise QScorerError(f"{source}: 'conversations' must be a non-empty list of messages")
    for number, message in enumerate(conversations):
        if not (isinstance(message, dict) and message.get("from") in (HUMAN, GPT)
                and isinstance(message.get("value"), str)):
            raise QScorerError(
                f"{source}: conversation message {number} must be {{'from': 'human' | 'gpt', 'value': str}}, "
                f"got {message!r}"
            )
    turns = conversations[1:] if conversations[0]["from"] != HUMAN else conversations
    for number, message in enumerate(turns):
        expected = HUMAN if number % 2 == 0 else GPT
        if message["from"] != expected:
            raise QScorerError(f"{source}: conversation turns must alternate human / gpt (message {number} is "
                               f"from {message['from']!r})")
    if len(turns) < 2:
        raise QScorerError(f"{source}: the conversation has no answer from 'gpt' to learn from")
    if not any(DEFAULT_IMAGE_TOKEN in message["value"] for message in turns if message["from"] == HUMAN):
        raise QScorerError(f"{source}: no {DEFAULT_IMAGE_TOKEN} placeholder in a human message")
    return tuple(conversations)


def load_meta(path: str | os.PathLike) -> list[MetaRecord]:
    """All records of one meta file, validated."""
    return [parse_record(raw, path, index) for index, raw in enumerate(read_json_records(path))]


def load_metas(data_paths: Sequence[str | os.PathLike],
               data_weights: Sequence[int] | None = None) -> list[tuple[list[MetaRecord], int]]:
    """``(records, weight)`` per meta file; ``data_weights`` default to 1 each (the original defaulted to none,
    giving an empty training set)."""
    if not data_paths:
        raise QScorerError("no meta files given (data_paths is empty)")
    weights = [1] * len(data_paths) if data_weights is None or len(data_weights) == 0 else list(data_weights)
    if len(weights) != len(data_paths):
        raise QScorerError(f"{len(data_paths)} meta files but {len(weights)} data_weights; give one weight per file")
    for path, weight in zip(data_paths, weights):
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise QScorerError(f"data weight of {path} must be an integer >= 0, got {weight!r}")
    return [(load_meta(path), weight) for path, weight in zip(data_paths, weights)]


def _training_template(template: str | ConversationTemplate) -> ConversationTemplate:
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TRAINING_VERSIONS:
        raise QScorerError(f"training supports the conversation versions {list(TRAINING_VERSIONS)}, got {template!r}")
    return get_template(template)


class SingleDataset(Dataset):
    """Training items of meta records: pixel values, ids and labels, task type and score.

    An item is ``{"input_ids", "labels"}`` (1-D LongTensors), ``"image"`` (float32 [n, 3, 448, 448]; n = 1 for an
    image, the number of paths of a list record, the frames of an .mp4 sampled at 1 fps), ``"task_type"`` and
    ``"gt_score"`` (float; NaN on a description record without one). Relative image paths are joined to
    ``image_folder`` (or used as they are without it).
    """

    def __init__(self, data_paths: Sequence[str | os.PathLike], tokenizer, *,
                 data_weights: Sequence[int] | None = None, image_folder: str | os.PathLike | None = None,
                 image_aspect_ratio: str = "pad", template: str | ConversationTemplate = "v1",
                 model_max_length: int | None = None, on_unreadable: str = "error"):
        if on_unreadable not in UNREADABLE_POLICIES:
            raise QScorerError(f"on_unreadable must be one of {list(UNREADABLE_POLICIES)}, got {on_unreadable!r}")
        self.tokenizer = tokenizer
        self.image_folder = image_folder
        self.image_aspect_ratio = image_aspect_ratio
        self.template = _training_template(template)
        self.model_max_length = model_max_length or tokenizer.model_max_length
        self.on_unreadable = on_unreadable
        self.metas = load_metas(data_paths, data_weights)
        self.records: list[MetaRecord] = []
        self.positions: list[tuple[int, int]] = []  # per item: (meta number, record number in that meta)
        for meta_number, (records, weight) in enumerate(self.metas):
            self.records.extend(records * weight)
            self.positions.extend([(meta_number, number) for number in range(len(records))] * weight)
        if not self.records:
            raise QScorerError(f"the training set is empty (meta files {list(map(str, data_paths))})")
        self._score_token_ids = frozenset(score_token_ids(tokenizer))
        logger.info("%d training items from %d meta files", len(self.records), len(self.metas))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Per item, the word count of its conversations (positive: every item has an image), for grouping."""
        return [record.word_count for record in self.records]

    def __getitem__(self, index: int) -> dict:
        candidates = (self.records[(index + step) % len(self)] for step in range(len(self)))
        record, pixels = self._first_readable(candidates)
        return self.build_item(record, pixels)

    def _first_readable(self, records: Iterable[MetaRecord]) -> tuple[MetaRecord, torch.Tensor]:
        for record in records:
            try:
                return record, self.load_pixels(record)
            except UnreadableImageError as error:
                if self.on_unreadable == "error":
                    raise UnreadableImageError(
                        f"{record.source}: {error} (on_unreadable='skip' substitutes the next readable record)"
                    ) from error
                logger.warning("%s: %s; skipped, using the next readable record instead", record.source, error)
        raise QScorerError("no readable image among the candidate records; check image_folder and the image paths")

    def _path(self, image: str) -> str:
        return os.path.join(self.image_folder, image) if self.image_folder is not None else image

    def load_pixels(self, record: MetaRecord) -> torch.Tensor:
        """Float32 [n, 3, 448, 448] pixel values of a record's image, image list or video."""
        if record.is_video:
            frames = load_video_frames(self._path(record.images[0]))
        else:
            frames = [load_image(self._path(image)) for image in record.images]
        return process_images(frames, self.image_aspect_ratio)

    def build_item(self, record: MetaRecord, pixels: torch.Tensor) -> dict:
        """The training item of ``record`` with its already loaded ``pixels``."""
        n_images = pixels.shape[0]
        input_ids, labels = preprocess(record.conversations, self.tokenizer, n_images=n_images,
                                       template=self.template, model_max_length=self.model_max_length,
                                       source=record.source)
        input_ids, labels = self._fit_context(input_ids, labels, n_images, record)
        if record.gt_score is None and self._score_token_ids.intersection(labels):
            raise QScorerError(f"{record.source}: the answer has a score token but the record has no 'gt_score'")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "image": pixels,
            "task_type": record.task_type,
            "gt_score": math.nan if record.gt_score is None else record.gt_score,
        }

    def _fit_context(self, input_ids: list[int], labels: list[int], n_images: int,
                     record: MetaRecord) -> tuple[list[int], list[int]]:
        """Truncate so the sequence fits ``model_max_length`` after each image id expands to 65 rows.

        (The original truncated the ids before expansion, so sequences could exceed the limit by 64 per image.)
        """
        keep = self.model_max_length - n_images * (NUM_VISUAL_TOKENS - 1)
        if len(input_ids) <= keep:
            return input_ids, labels
        if keep <= 0 or IMAGE_TOKEN_INDEX in input_ids[keep:]:
            raise QScorerError(f"{record.source}: {n_images} image(s) and the text do not fit model_max_length "
                               f"{self.model_max_length}; truncating would cut off an image")
        logger.warning("%s: %d ids with %d image(s) exceed model_max_length %d after image expansion; truncated",
                       record.source, len(input_ids), n_images, self.model_max_length)
        return input_ids[:keep], labels[:keep]


class PairDataset(SingleDataset):
    """Pairs of training items drawn from the same meta file, for the pair (ranking) losses.

    Item ``i`` is ``{"item_A": item i, "item_B": another record of the same meta}``; B is drawn uniformly among the
    meta's other records, deterministically from ``(seed, epoch, i)`` (:meth:`set_epoch` draws new pairs). Each
    half is a :class:`SingleDataset` item plus ``"gt_score_norm"`` and ``"std"``, read from the record fields
    ``score_field`` and ``std_field`` (default ``gt_score_norm`` and ``std_norm``: DeQA-Score's soft-label fields,
    4 * (mos - min) / (max - min) + 1 in [1, 5] and 4 * std / (max - min), min and max over the dataset's MOS).
    """

    def __init__(self, data_paths: Sequence[str | os.PathLike], tokenizer, *, seed: int = 0,
                 score_field: str = "gt_score_norm", std_field: str = "std_norm", **options):
        super().__init__(data_paths, tokenizer, **options)
        self.seed = seed
        self.epoch = 0
        self.score_field = score_field
        self.std_field = std_field
        for (records, _), path in zip(self.metas, data_paths):
            if len(records) < 2:
                raise QScorerError(f"meta file {path} has {len(records)} record(s); pairs need at least 2")
            for record in records:
                for field in (score_field, std_field):
                    if not _number(record.fields.get(field)):
                        raise QScorerError(f"{record.source}: pair training needs a numeric {field!r}, got "
                                           f"{record.fields.get(field)!r}")

    def set_epoch(self, epoch: int) -> None:
        """Draw a new B for every item (the pairs are a function of seed, epoch and index)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        meta_number, number = self.positions[index]
        records, _ = self.metas[meta_number]
        # With on_unreadable="skip", A is replaced by the next readable record of the same meta.
        first, pixels = self._first_readable(records[(number + step) % len(records)] for step in range(len(records)))
        others = [record for record in records if record is not first]
        generator = random.Random(f"{self.seed}/{self.epoch}/{index}")
        second, second_pixels = self._first_readable(generator.sample(others, len(others)))
        return {"item_A": self._pair_item(first, pixels), "item_B": self._pair_item(second, second_pixels)}

    def _pair_item(self, record: MetaRecord, pixels: torch.Tensor) -> dict:
        item = self.build_item(record, pixels)
        item["gt_score_norm"] = float(record.fields[self.score_field])
        item["std"] = float(record.fields[self.std_field])
        return item


@dataclass(frozen=True)
class SingleCollator:
    """Batches single items: right-pads ids with ``pad_token_id`` and labels with -100 to the longest,
    truncates to ``model_max_length``; ``attention_mask`` marks each row's real ids (built from the lengths, since a
    literal ``<unk>`` has the pad id 0); ``gt_scores`` float32; ``images`` stacked [B, n, 3, 448, 448] when all
    shapes agree, else a list; ``task_types`` a list; ``input_type`` "single"."""

    pad_token_id: int = 0
    model_max_length: int = 2048

    @classmethod
    def from_tokenizer(cls, tokenizer, model_max_length: int | None = None) -> SingleCollator:
        return cls(tokenizer.pad_token_id, model_max_length or tokenizer.model_max_length)

    def __call__(self, instances: Sequence[Mapping]) -> dict:
        lengths = [len(instance["input_ids"]) for instance in instances]
        width = max(lengths)
        input_ids = torch.full((len(instances), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(instances), width), dtype=torch.bool)
        for row, (instance, length) in enumerate(zip(instances, lengths)):
            input_ids[row, :length] = torch.as_tensor(instance["input_ids"])
            labels[row, :length] = torch.as_tensor(instance["labels"])
            attention_mask[row, :length] = True
        images = [instance["image"] for instance in instances]
        if all(image.shape == images[0].shape for image in images):
            images = torch.stack(images)
        return {
            "input_type": "single",
            "input_ids": input_ids[:, : self.model_max_length],
            "labels": labels[:, : self.model_max_length],
            "attention_mask": attention_mask[:, : self.model_max_length],
            "task_types": [instance["task_type"] for instance in instances],
            "gt_scores": torch.tensor([float(instance["gt_score"]) for instance in instances], dtype=torch.float32),
            "images": images,
        }


@dataclass(frozen=True)
class PairCollator:
    """Batches pair items: ``item_A`` / ``item_B`` are each a :class:`SingleCollator` batch (what the model's
    forward takes), and the pair-loss targets are float32 tensors ``gt_scores_norm_A/_B`` and ``stds_A/_B``;
    ``input_type`` is "pair"."""

    single: SingleCollator = SingleCollator()

    @classmethod
    def from_tokenizer(cls, tokenizer, model_max_length: int | None = None) -> PairCollator:
        return cls(SingleCollator.from_tokenizer(tokenizer, model_max_length))

    def __call__(self, instances: Sequence[Mapping]) -> dict:
        batch: dict = {"input_type": "pair"}
        for half in ("A", "B"):
            items = [instance[f"item_{half}"] for instance in instances]
            batch[f"item_{half}"] = self.single(items)
            batch[f"gt_scores_norm_{half}"] = torch.tensor([item["gt_score_norm"] for item in items],
                                                           dtype=torch.float32)
            batch[f"stds_{half}"] = torch.tensor([item["std"] for item in items], dtype=torch.float32)
        return batch
