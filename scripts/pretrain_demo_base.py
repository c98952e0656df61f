"""Rebuild the tiny pretrained base that ``qscorer demo`` fine-tunes (``qscorer/assets/demo_base``).

    python scripts/pretrain_demo_base.py [--out qscorer/assets/demo_base] [--steps 3000]

See :mod:`qscorer.demo_base` for the recipe: ``qscorer synth`` on six bundled photos the demo never uses, the vision
encoder pretrained to describe the distortions (which one, how strong), then placed in a randomly initialised tiny
mPLUG-Owl2. Deterministic for a seed on one machine; about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from qscorer.demo_base import PRETRAINING_SEED, SHIPPED_BASE, pretrain_demo_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", default=str(SHIPPED_BASE), help="base folder to write (replaced files)")
    parser.add_argument("--num-train", type=int, default=6000, help="pretraining images")
    parser.add_argument("--steps", type=int, default=3000, help="pretraining steps of 32 images")
    parser.add_argument("--seed", type=int, default=PRETRAINING_SEED)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        pretrain_demo_base(args.out, workdir, num_train=args.num_train, steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
