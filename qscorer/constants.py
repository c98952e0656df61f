"""Constants of the text pipeline and the entry points (values of the original code). The model's own conventions
(token ids, image normalisation) are in :mod:`qscorer.model.constants`."""

DEFAULT_IMAGE_TOKEN = "<|image|>"
"""Text placeholder for an image inside a prompt; it is not a vocabulary token."""

SCORE_TOKENS = ("<score1>", "<score2>", "<score3>", "<score4>", "<score5>")
"""Score tokens in the order they are added to the tokenizer (ids 32000..32004 on LLaMA-2)."""

SCORE_TOKENS_REPORT_ORDER = tuple(reversed(SCORE_TOKENS))
"""The order in which the original reports score-token logits: <score5> first."""

LONE_SPACE_TOKEN_ID = 29871
"""LLaMA-2 piece "▁" that precedes a score token in the trained answer ("... is ▁ <scoreN>")."""

LEVEL_WORDS = ("bad", "poor", "fair", "good", "excellent")
"""Quality level words for levels 1..5 (the Q-Align / DeQA answer vocabulary)."""
