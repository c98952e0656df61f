"""Rebuild the tiny pretrained base that ``qscorer demo`` fine-tunes (``qscorer/assets/demo_base``).

    python scripts/pretrain_demo_base.py [--out qscorer/assets/demo_base] [--steps 12000]

See :mod:`qscorer.demo_base` for the recipe: ``qscorer synth`` crops of the bundled photos kept out of the corners
that hold every held-out crop, and dead-leaves images; the vision encoder pretrained to describe the distortions
(which one, how strong), then placed in a randomly initialised tiny mPLUG-Owl2. Deterministic for a seed on one
machine; about 26 minutes on 2 CPU cores (4 to 5 of them preparing the images).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import torch

from qscorer.demo_base import PRETRAINING_SEED, SHIPPED_BASE, pretrain_demo_base
from qscorer.errors import QScorerError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", default=str(SHIPPED_BASE), help="base folder to write (replaced files)")
    parser.add_argument("--num-photo-images", type=int, default=12000, help="pretraining images cropped from photos")
    parser.add_argument("--num-dead-leaves", type=int, default=12000, help="pretraining dead-leaves images")
    parser.add_argument("--steps", type=int, default=12000, help="pretraining steps of 32 images")
    parser.add_argument("--seed", type=int, default=PRETRAINING_SEED)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        try:
            pretrain_demo_base(args.out, workdir, num_photo_images=args.num_photo_images,
                               num_dead_leaves=args.num_dead_leaves, steps=args.steps, seed=args.seed)
        except QScorerError as error:
            sys.exit(f"pretrain_demo_base.py: {error}")


if __name__ == "__main__":
    main()
