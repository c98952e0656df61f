"""Score a folder of images, a parquet file of image bytes or a test meta with Ray Data, and write parquet.

    python examples/ray_score_parquet.py photos/ --output scores/ --num-actors 4 --num-gpus-per-actor 1 \\
        --model-path checkpoints/Qscorer_lora_5_1 --model-base models/mplug-owl2-llama2-7b
    python examples/ray_score_parquet.py shards/part-000.parquet --image-column jpeg --output scores/ ...
    python examples/ray_score_parquet.py koniq/metas/test_koniq_2k.json --root-dir koniq/ --output scores/ ...

The input kind follows from the path: a ``.json`` / ``.jsonl`` meta (``id``, ``image``, ``gt_score``; images under
``--root-dir``), a ``.parquet`` file or a folder of them (encoded image bytes in ``--image-column``; the other
columns are kept), or else a folder of images (every image file in it and below; ``path`` names the rows;
``s3://``, ``gs://`` ... folders work as Ray reads them). The output is a folder of parquet files with the
input's columns (image bytes dropped), ``score``, the five logits ``<score5>`` .. ``<score1>``, ``token_id`` and
``error`` (null unless the image could not be read). Needs ``pip install 'qscorer[ray]'``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qscorer.cli.options import add_model_arguments, add_scoring_arguments, scorer_options
from qscorer.cli.score import IMAGE_SUFFIXES
from qscorer.errors import QScorerError
from qscorer.inference import load_test_records
from qscorer.ray_data import raising_user_errors, require_ray, score_dataset
from qscorer.ray_inference import ray_session

logger = logging.getLogger("ray_score_parquet")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a folder of images, a parquet file (or folder of them), or a meta .json/.jsonl")
    parser.add_argument("--output", required=True, help="folder the parquet files are written to")
    parser.add_argument("--image-column", default="image", help="parquet input: the column of image bytes")
    parser.add_argument("--root-dir", default=".", help="meta input: the folder its image paths are relative to")
    parser.add_argument("--num-actors", type=int, default=1, help="scoring actors")
    parser.add_argument("--num-gpus-per-actor", type=float, default=0, help="GPUs per actor (0: score on CPU)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster; default: RAY_ADDRESS or a local one")
    add_model_arguments(parser)
    add_scoring_arguments(parser, batch_size=8, num_workers=0)
    return parser.parse_args(argv)


def read_input(ray, args: argparse.Namespace):
    """The input as a Ray Dataset, with the keywords that tell :func:`score_dataset` where its images are."""
    source = str(args.input)
    if source.endswith((".json", ".jsonl")):
        rows = [
            {"id": record.id, "image": str(Path(args.root_dir) / record.image), "gt_score": record.gt_score}
            for record in load_test_records(source)
        ]
        return ray.data.from_items(rows), dict(image_column="image")
    if source.endswith(".parquet") or (Path(source).is_dir() and any(Path(source).glob("*.parquet"))):
        dataset = ray.data.read_parquet(source)
        if args.image_column not in dataset.schema().names:
            raise QScorerError(f"{source} has no column {args.image_column!r} (columns: {dataset.schema().names})")
        return dataset, dict(image_column=args.image_column)
    suffixes = [suffix.lstrip(".") for suffix in sorted(IMAGE_SUFFIXES)]
    images = ray.data.read_binary_files(source, include_paths=True, file_extensions=suffixes)
    return images, dict(image_column="bytes", name_column="path")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if "://" not in args.input and not Path(args.input).exists():
            raise QScorerError(f"input {args.input} does not exist")
        options = scorer_options(args)
        options.pop("num_workers")
        with ray_session(args.ray_address), raising_user_errors():
            dataset, columns = read_input(require_ray(), args)
            scored = score_dataset(
                dataset,
                args.model_path,
                args.model_base,
                args.preprocessor_path,
                num_actors=args.num_actors,
                num_gpus_per_actor=args.num_gpus_per_actor,
                **columns,
                **options,
            )
            scored.write_parquet(args.output)
    except QScorerError as error:
        print(f"ray_score_parquet: error: {error}", file=sys.stderr)
        return 2
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
