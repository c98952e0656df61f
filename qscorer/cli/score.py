"""``qscorer score IMAGES...``: print the quality score of image files, folders and globs."""

from __future__ import annotations

import csv
import glob
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from ..constants import SCORE_TOKENS_REPORT_ORDER
from ..errors import QScorerError
from .options import add_model_arguments, add_scoring_arguments, build_scorer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="*", help="image files, folders or glob patterns")
    parser.add_argument("--img_path", "--img-path", nargs="+", default=[], help="more images (the original's flag)")
    add_model_arguments(parser)
    add_scoring_arguments(parser, batch_size=8, num_workers=0)
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text", help="default: path<TAB>score")


def run(args) -> int:
    paths = expand_image_arguments([*args.images, *args.img_path])
    if not paths:
        raise QScorerError("no images given: pass files, folders or globs")
    results = build_scorer(args).score(paths, progress=len(paths) > args.batch_size)
    write_results(results, args.format, sys.stdout)
    failed = [result for result in results if result.error]
    for result in failed:
        print(f"qscorer score: error: {result.error}", file=sys.stderr)
    return 2 if failed else 0


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


def write_results(results, output_format: str, stream) -> None:
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
        json.dump(records, stream, indent=1, allow_nan=False)
        stream.write("\n")
    else:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["image", "score", *SCORE_TOKENS_REPORT_ORDER, "token_id"])
        for result in good:
            writer.writerow([result.image, repr(result.score), *map(repr, result.logits.values()), result.token_id])
