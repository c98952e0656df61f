"""A tiny LLaMA-style tokenizer, trained on the spot, for the demo and tests that run without any download.

The real LLaMA-2 tokenizer ships with the base model (``tokenizer.model``, 32000 pieces), which the no-download
demo does not have. This builds a small sentencepiece BPE model with LLaMA-2's conventions: ids 0/1/2 =
``<unk>``/``<s>``/``</s>``, byte fallback, split digits, a dummy prefix, no normalisation, whitespace-only pieces
allowed (so "is <score4>" gives "▁is ▁ <score4>" like LLaMA-2). It is trained deterministically on the prompt
and answer texts of this package plus a few lines of plain English, and saved with the tokenizer configs, so that
:func:`qscorer.data.load_tokenizer` loads the folder (score tokens get the ids right after its vocabulary).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..constants import LEVEL_WORDS
from .conversation import ANSWER_PREFIX, SCORING_QUESTION, V1_SYSTEM_MESSAGE

DEMO_VOCAB_SIZE = 512

_PLAIN_ENGLISH = (
    "A photograph can be sharp or blurry, bright or dark, clean or noisy.",
    "Compression leaves blocks and ringing around edges; heavy noise hides fine texture.",
    "USER: What do you see in this picture? ASSISTANT: A cat sitting on a red chair near the window.",
    "The colours are vivid, the exposure is balanced and the details are crisp.",
    "Low contrast makes the scene look washed out and flat.",
    "Pixelation turns smooth gradients into large square tiles.",
    "Please describe the image, then rate its quality from 1 to 5.",
    "There are 2 dogs, 3 trees and 10 birds in the photo taken in 2023.",
)


def _corpus() -> list[str]:
    question = f"USER: {SCORING_QUESTION}\nASSISTANT: {ANSWER_PREFIX}"
    lines = [V1_SYSTEM_MESSAGE, question, *_PLAIN_ENGLISH]
    lines += [f"{ANSWER_PREFIX} {word}." for word in LEVEL_WORDS]
    lines += [f"The image quality is {word}, the picture looks {word}." for word in LEVEL_WORDS]
    return lines * 20


def build_demo_tokenizer(output_dir: str | Path, *, vocab_size: int = DEMO_VOCAB_SIZE) -> Path:
    """Train the demo tokenizer and write ``tokenizer.model``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``output_dir``; returns the folder. The same call gives the same bytes."""
    import sentencepiece

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (output / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    special_map = {**special, "pad_token": "<unk>"}
    (output / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, allow_nan=False) + "\n")
    return output
