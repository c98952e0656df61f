"""``qscorer synth``: build the synthetic IQA dataset that the demo and the tests use."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..data.synthetic import DISTORTIONS, SOURCE_PHOTOS

    parser.add_argument("--out", required=True, type=Path, help="output folder (absent, empty or a previous synth)")
    parser.add_argument("--num-train", type=int, default=400, help="train images (default 400)")
    parser.add_argument("--num-test", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images in px (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--distortions",
        default=",".join(DISTORTIONS),
        help=f"comma-separated distortions (default all: {','.join(DISTORTIONS)})",
    )
    parser.add_argument(
        "--photos",
        default=",".join(SOURCE_PHOTOS),
        help=f"comma-separated scikit-image photos to crop (default all: {','.join(SOURCE_PHOTOS)})",
    )


def run(args: argparse.Namespace) -> int:
    """Build the dataset and print its folder."""
    from ..data.synthetic import build_synthetic_iqa

    result = build_synthetic_iqa(
        args.out,
        num_train=args.num_train,
        num_test=args.num_test,
        image_size=args.image_size,
        seed=args.seed,
        distortions=_names(args.distortions),
        photos=_names(args.photos),
    )
    print(result["out_dir"])
    return 0


def _names(option: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in option.split(",") if name.strip())
