"""Draw fig/architecture.png and write fig/sample.jpg (run: python fig/make_figures.py).

The sample photo is scikit-image's ``coffee`` image: "No copyright restrictions. CC0 by the photographer
(Rachel Michetti)", courtesy of Pikolo Espresso Bar (scikit-image's data documentation).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent

BOXES = {
    "image": (0.2, 4.3, 2.2, 0.9, "image\n(RGB, padded to a square,\n448 px, CLIP-normalised)", "#f2f2f2"),
    "vision": (0.2, 2.8, 2.2, 1.0, "ViT-L/14 vision encoder\n24 layers, QuickGELU\n1025 tokens x 1024", "#dbe9f6"),
    "abstractor": (
        0.2,
        1.2,
        2.2,
        1.1,
        "visual abstractor\n6 cross-attention layers\n64 queries + vit_eos\n= 65 tokens x 4096",
        "#dbe9f6",
    ),
    "prompt": (
        3.0,
        4.3,
        3.0,
        0.9,
        "prompt ids: USER: How would you rate the\n"
        "quality of this image? <image> ASSISTANT:\nThe quality of the image is",
        "#f2f2f2",
    ),
    "llm": (
        3.0,
        1.2,
        3.0,
        2.5,
        "modality-adaptive LLaMA-2-7B\n32 layers\n\ntext tokens -> k/v/norm branch 0\n"
        "visual tokens -> k/v/norm branch 1\nq, o, MLP shared",
        "#fde9d9",
    ),
    "lm_head": (6.6, 3.0, 2.4, 0.9, 'lm_head\n"▁" then <score1..5>\n(next-token logits)', "#e2f0d9"),
    "deepmlp": (
        6.6,
        1.2,
        2.4,
        1.2,
        "DeepMLP head\n4096 -> 2048 -> 1024 -> 1\nreads the hidden state\nbefore <scoreN>",
        "#e2f0d9",
    ),
    "score": (6.6, 0.0, 2.4, 0.7, "quality score (about 1..5)", "#fff2cc"),
}

ARROWS = [
    ("image", "vision"),
    ("vision", "abstractor"),
    ("abstractor", "llm"),
    ("prompt", "llm"),
    ("llm", "lm_head"),
    ("llm", "deepmlp"),
    ("deepmlp", "score"),
]


def _anchor(name: str, side: str) -> tuple[float, float]:
    x, y, width, height = BOXES[name][:4]
    return {
        "top": (x + width / 2, y + height),
        "bottom": (x + width / 2, y),
        "left": (x, y + height / 2),
        "right": (x + width, y + height / 2),
    }[side]


def draw_architecture(path: Path) -> None:
    figure, axes = plt.subplots(figsize=(10, 6))
    for x, y, width, height, text, colour in BOXES.values():
        axes.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.05", fc=colour, ec="#404040"))
        axes.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=8.5)
    for start, end in ARROWS:
        vertical = BOXES[start][0] == BOXES[end][0]
        begin = _anchor(start, "bottom" if vertical else ("right" if BOXES[start][0] < BOXES[end][0] else "bottom"))
        finish = _anchor(end, "top" if vertical else ("left" if BOXES[start][0] < BOXES[end][0] else "top"))
        axes.add_patch(FancyArrowPatch(begin, finish, arrowstyle="-|>", mutation_scale=14, color="#404040"))
    axes.text(
        4.5,
        0.45,
        "visual tokens are spliced into the text\nat the <image> placeholder (id -200)",
        ha="center",
        fontsize=8,
        style="italic",
    )
    axes.set_xlim(0, 9.2)
    axes.set_ylim(-0.2, 5.4)
    axes.axis("off")
    axes.set_title("Q-Scorer: mPLUG-Owl2 with score tokens and a regression head", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def write_sample_photo(path: Path) -> None:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.coffee()).save(path, quality=92)


if __name__ == "__main__":
    draw_architecture(HERE / "architecture.png")
    write_sample_photo(HERE / "sample.jpg")
    print(HERE / "architecture.png", HERE / "sample.jpg")
