"""Score images with a Q-Scorer checkpoint, with the original scorer.py's flags.

    python scorer.py --model-path checkpoints/Qscorer_lora_5_1 --model-base mplug-owl2-llama2-7b \
        --preprocessor-path preprocessor --img_path photo.jpg [more.jpg ...] [--device cuda:0]

This is ``qscorer score`` under another name: every option of ``qscorer score --help`` works here too. The default
prompt is the original's batch-evaluation prompt; ``--prompt scorer`` gives the numbers of the original scorer.py
(which did not clamp: add ``--no-clamp``).
"""

import sys

from qscorer.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
