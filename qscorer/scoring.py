"""Score images with a Q-Scorer checkpoint: the ``Scorer`` Python API and the ``qscorer score`` command.

Each image is scored with one prefill and one KV-cached step (``MPLUGOwl2LlamaForCausalLM.predict_scores``), which
gives the numbers of the original's two full forward passes. The prompt is the original's batch-evaluation prompt
by default (``prompt="eval"``, the one behind the published results); ``prompt="scorer"`` is the prompt of the
original scorer.py and ``model.score()``. Scores are clamped to [0, 5] by default, like ``model.score()``.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .constants import SCORE_TOKENS_REPORT_ORDER
from .errors import QScorerError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PROMPTS = ("eval", "scorer")


@dataclass
class ImageScore:
    """One image's result; ``error`` is set (and the rest None) when the image could not be read."""

    image: str
    score: float | None = None
    logits: dict[str, float] | None = None
    probs: dict[str, float] | None = None
    token_id: int | None = None
    error: str | None = None


class ImageSourceDataset(Dataset):
    """Paths, PIL images or pixel tensors [3, 448, 448] -> (index, pixels or None, error or None).

    Paths are decoded and preprocessed here, i.e. in DataLoader workers when ``num_workers`` > 0; a file that
    cannot be read yields its error message instead of pixels.
    """

    def __init__(self, sources: Sequence, image_aspect_ratio: str = "pad"):
        self.sources = list(sources)
        self.image_aspect_ratio = image_aspect_ratio

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        from .data.image import load_image, process_images

        source = self.sources[index]
        if isinstance(source, torch.Tensor):
            return index, source, None
        try:
            image = source if isinstance(source, Image.Image) else load_image(source)
            return index, process_images([image], self.image_aspect_ratio)[0], None
        except QScorerError as error:
            return index, None, str(error)


def collate_sources(items):
    """Keep indices, stack the decoded pixels, and pass errors through."""
    indices = [index for index, _, _ in items]
    pixels = [pixels for _, pixels, _ in items if pixels is not None]
    errors = {index: error for index, _, error in items if error is not None}
    return indices, (torch.stack(pixels) if pixels else None), errors


def source_name(source, index: int) -> str:
    """A path as given, or a placeholder naming the position of an in-memory image."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"


class Scorer:
    """Quality scores from a Q-Scorer checkpoint.

    >>> scorer = Scorer("checkpoints/Qscorer_lora_5_1", model_base="mplug-owl2-llama2-7b")
    >>> scorer(["a.jpg", "b.png"])        # list of floats
    >>> scorer.score(["a.jpg"])[0].logits  # {"<score5>": ..., ..., "<score1>": ...}
    >>> scorer.score_tensor(pixels)        # differentiable [B] tensor, for metrics / losses / rewards

    Inputs: paths, PIL images, or pixel tensors ([3, 448, 448] or [B, 3, 448, 448], as from
    ``qscorer.data.process_images``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        model_base: str | os.PathLike | None = None,
        preprocessor_path: str | os.PathLike | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompt: str = "eval",
        clamp: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        attn_implementation: str | None = None,
        allow_unexpected_keys: bool = False,
    ):
        from .loading import load_pretrained_model

        tokenizer, model, _, _ = load_pretrained_model(
            model_path,
            model_base,
            preprocessor_path,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            allow_unexpected_keys=allow_unexpected_keys,
        )
        self._setup(model, tokenizer, prompt, clamp, batch_size, num_workers)

    @classmethod
    def from_cli_arguments(cls, args, **overrides) -> Scorer:
        """A scorer from parsed command-line options (``add_model_arguments`` plus prompt, clamp, batch size and
        workers); ``overrides`` replace any of the keyword options."""
        options = dict(
            device=args.device,
            dtype=args.dtype,
            prompt=args.prompt,
            clamp=not args.no_clamp,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            attn_implementation=args.attn_implementation,
            allow_unexpected_keys=args.allow_unexpected_keys,
        )
        options.update(overrides)
        return cls(args.model_path, args.model_base, args.preprocessor_path, **options)

    @classmethod
    def from_model(
        cls, model, tokenizer, *, prompt: str = "eval", clamp: bool = True, batch_size: int = 8, num_workers: int = 0
    ) -> Scorer:
        """A scorer around an already loaded model and tokenizer (e.g. right after training)."""
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, prompt, clamp, batch_size, num_workers)
        return scorer

    def _setup(self, model, tokenizer, prompt: str, clamp: bool, batch_size: int, num_workers: int) -> None:
        from .data.conversation import scoring_prompt_ids

        if prompt not in PROMPTS:
            raise QScorerError(f"unknown prompt {prompt!r}: choose one of {list(PROMPTS)}")
        if batch_size < 1:
            raise QScorerError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.prompt, self.clamp = prompt, clamp
        self.batch_size, self.num_workers = batch_size, num_workers
        self.prompt_ids = torch.tensor(scoring_prompt_ids(tokenizer, prompt), dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, pixel_values: torch.Tensor):
        """``ScorePrediction`` for a pixel batch [B, 3, 448, 448], without gradients."""
        with torch.inference_mode():
            return self._predict(pixel_values)

    def _predict(self, pixel_values: torch.Tensor):
        pixel_values = pixel_values.to(self.device)
        input_ids = self.prompt_ids.to(self.device).expand(pixel_values.shape[0], -1)
        return self.model.predict_scores(input_ids, pixel_values)

    def score_tensor(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Differentiable scores [B] of a pixel batch (autograd graph kept; clamped if ``clamp``).

        Gradients reach ``pixel_values`` through the vision encoder, abstractor, LLM and head; use it as a metric,
        a loss or a reward. The chosen continuation token (an argmax) is not differentiated.
        """
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        scores = self._predict(pixel_values).scores.float()
        return scores.clamp(0.0, 5.0) if self.clamp else scores

    def __call__(self, images) -> list[float]:
        """Scores of one image or a list of images; an unreadable image raises ``QScorerError``."""
        results = self.score(images)
        failed = [result for result in results if result.error]
        if failed:
            raise QScorerError(failed[0].error)
        return [result.score for result in results]

    def score(self, images, *, progress: bool = False) -> list[ImageScore]:
        """Per-image results (score, the five score-token logits and probabilities, the appended token).

        Images that cannot be read get an ``ImageScore`` with ``error`` set; the others are still scored.
        """
        sources = _as_list(images)
        loader = DataLoader(
            ImageSourceDataset(sources),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_sources,
        )
        results: list[ImageScore | None] = [None] * len(sources)
        for indices, pixels, errors in tqdm(loader, desc="scoring", unit="batch", disable=not progress):
            for index, error in errors.items():
                logger.error("%s", error)
                results[index] = ImageScore(image=source_name(sources[index], index), error=error)
            good = [index for index in indices if index not in errors]
            if not good:
                continue
            prediction = self.predict(pixels)
            for row, index in enumerate(good):
                results[index] = self.image_score(source_name(sources[index], index), prediction, row)
        return results

    def image_score(self, name: str, prediction, row: int) -> ImageScore:
        """The ``ImageScore`` of row ``row`` of a ``predict`` result (clamped if ``clamp``)."""
        score = float(prediction.scores[row].float())
        if self.clamp:
            score = min(max(score, 0.0), 5.0)
        logits = prediction.score_token_logits[row].tolist()
        probs = prediction.score_token_probs[row].tolist()
        return ImageScore(
            image=name,
            score=score,
            logits=dict(zip(SCORE_TOKENS_REPORT_ORDER, logits)),
            probs=dict(zip(SCORE_TOKENS_REPORT_ORDER, probs)),
            token_id=int(prediction.token_ids[row]),
        )


def score_with_two_full_passes(model, input_ids: torch.Tensor, pixel_values: torch.Tensor):
    """The original procedure (facts §4.8), kept as the reference for checks and benchmarks: a full forward picks
    the argmax token after the prompt; a second full forward (vision encoder and abstractor again) of the prompt
    plus that token gives the head's input. Returns (appended token ids, scores, score-token logits, hidden)."""
    with torch.no_grad():
        first = model(input_ids=input_ids, images=pixel_values, use_cache=False)
        appended = first.logits[:, -1].argmax(-1)
        extended = torch.cat([input_ids, appended[:, None]], dim=1)
        second = model(input_ids=extended, images=pixel_values, use_cache=False)
        hidden = second.last_hidden_state[:, -1]
        score_ids = torch.tensor(model.config.score_token_id, device=hidden.device)
        return appended, model.deepmlp(hidden), second.logits[:, -1][:, score_ids], hidden


def share_cpu_with_workers(num_workers: int, device: str | torch.device) -> None:
    """On CPU, leave one core per DataLoader worker: torch's intra-op threads slow down several-fold when the
    decoding workers already occupy every core. (Called by ``qscorer score`` / ``qscorer infer``.)"""
    from .loading import resolve_device

    if num_workers > 0 and resolve_device(device).type == "cpu":
        threads = max(1, (os.cpu_count() or 1) - num_workers)
        if threads < torch.get_num_threads():
            logger.info("%d decoding workers: torch uses %d CPU thread(s)", num_workers, threads)
            torch.set_num_threads(threads)


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def expand_image_arguments(arguments: Iterable[str]) -> list[str]:
    """Files as given, folders as their image files (sorted, not recursive), globs as their matches (sorted).

    A folder without images or a glob without matches is an error naming it. Paths that do not exist are kept,
    so that scoring reports them per image.
    """
    paths: list[str] = []
    for argument in arguments:
        if Path(argument).is_dir():
            found = sorted(str(p) for p in Path(argument).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise QScorerError(f"folder {argument} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif glob.has_magic(argument):
            found = sorted(p for p in glob.glob(argument, recursive=True) if Path(p).is_file())
            if not found:
                raise QScorerError(f"no files match {argument}")
            paths.extend(found)
        else:
            paths.append(argument)
    return paths


def add_model_arguments(parser) -> None:
    """The model options shared by ``score``, ``infer`` and ``merge`` (the original's flag names)."""
    parser.add_argument("--model-path", required=True, help="LoRA checkpoint folder, or a merged model folder")
    parser.add_argument("--model-base", default=None, help="base model folder (mplug-owl2-llama2-7b) for LoRA")
    parser.add_argument(
        "--preprocessor-path", default=None, help="tokenizer / image-processor configs (default: the model folders)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (fp32 on CPU, bf16 on GPU)")
    parser.add_argument(
        "--attn-implementation", default=None, choices=["sdpa", "eager", "flash_attention_2"], help="default: sdpa"
    )
    parser.add_argument(
        "--allow-unexpected-keys", action="store_true", help="load checkpoints that carry weights the model lacks"
    )


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="*", help="image files, folders or glob patterns")
    parser.add_argument("--img_path", "--img-path", nargs="+", default=[], help="more images (the original's flag)")
    add_model_arguments(parser)
    parser.add_argument("--prompt", choices=PROMPTS, default="eval", help="eval (default, published) or scorer")
    parser.add_argument("--no-clamp", action="store_true", help="do not clamp scores to [0, 5]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that decode images")
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text", help="default: path<TAB>score")


def run(args) -> int:
    paths = expand_image_arguments([*args.images, *args.img_path])
    if not paths:
        raise QScorerError("no images given: pass files, folders or globs")
    share_cpu_with_workers(args.num_workers, args.device)
    scorer = Scorer.from_cli_arguments(args)
    results = scorer.score(paths, progress=len(paths) > args.batch_size)
    write_results(results, args.format, sys.stdout)
    failed = [result for result in results if result.error]
    for result in failed:
        print(f"qscorer score: error: {result.error}", file=sys.stderr)
    return 2 if failed else 0


def write_results(results: list[ImageScore], output_format: str, stream) -> None:
    """text: ``path<TAB>score`` lines; json: one list of objects; csv: image, score, the five logits, token_id.

    Failed images are left out of text and csv output and carry their ``error`` in JSON.
    """
    good = [result for result in results if result.error is None]
    if output_format == "text":
        for result in good:
            stream.write(f"{result.image}\t{result.score!r}\n")
    elif output_format == "json":
        records = []
        for result in results:
            record = asdict(result)
            record.pop("probs")
            records.append({key: value for key, value in record.items() if key != "error" or value is not None})
        json.dump(records, stream, indent=1)
        stream.write("\n")
    else:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["image", "score", *SCORE_TOKENS_REPORT_ORDER, "token_id"])
        for result in good:
            writer.writerow([result.image, repr(result.score), *map(repr, result.logits.values()), result.token_id])
