"""Constants shared by the model, the data pipeline and the entry points (values of the original code)."""

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss ignores."""

IMAGE_TOKEN_INDEX = -200
"""Input id that marks where an image's visual tokens are spliced into the text sequence."""

DEFAULT_IMAGE_TOKEN = "<|image|>"
"""Text placeholder for an image inside a prompt; it is not a vocabulary token."""

SCORE_TOKENS = ("<score1>", "<score2>", "<score3>", "<score4>", "<score5>")
"""Score tokens in the order they are added to the tokenizer (ids 32000..32004 on LLaMA-2)."""

SCORE_TOKENS_REPORT_ORDER = tuple(reversed(SCORE_TOKENS))
"""The order in which the original reports score-token logits: <score5> first."""

LONE_SPACE_TOKEN_ID = 29871
"""LLaMA-2 piece "▁" that precedes a score token in the trained answer ("... is ▁ <scoreN>")."""

NUM_VISUAL_TOKENS = 65
"""Rows one image contributes to the LLM sequence: 64 abstractor queries + the vit_eos embedding."""

IMAGE_BACKGROUND = (122, 116, 104)
"""Padding colour of expand2square: int(255 * CLIP mean) per channel."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LEVEL_WORDS = ("bad", "poor", "fair", "good", "excellent")
"""Quality level words for levels 1..5 (the Q-Align / DeQA answer vocabulary)."""
