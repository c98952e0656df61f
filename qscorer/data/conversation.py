"""Conversation templates and the original's three prompts.

- scoring prompt, ``kind="scorer"`` (scorer.py and ``model.score()``): no system message, image after the question,
  "\\n" before ASSISTANT;
- scoring prompt, ``kind="eval"`` (batch evaluation, iqa_eval.py): the mplug_owl2 template, so a space before
  ASSISTANT;
- training prompt (the v1 template): system message, image moved before the question, " ASSISTANT: " and "</s>";
- scoring prompt, ``kind="training"`` (qscorer's addition; the original never scores with it): the training prompt
  up to the answer prefix, i.e. the context a fine-tuned model was trained to emit the score token after.

:func:`scoring_prompt_ids` gives the ids of the scoring prompts; :func:`qscorer.data.datasets.preprocess` those of
training records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..constants import DEFAULT_IMAGE_TOKEN, LEVEL_WORDS
from ..errors import QScorerError
from .tokenization import encode_text, tokenizer_image_token

SCORING_QUESTION = "How would you rate the quality of this image?"
"""The question of every inference prompt (training questions may vary per record)."""

ANSWER_PREFIX = "The quality of the image is"
"""Text the inference prompts end with; the model then emits "▁" and a score token."""

V1_SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

HUMAN, GPT = "human", "gpt"
"""The speaker names of a meta record's ``conversations``."""


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-separator chat template: ``system + sep`` (if any), then ``role: message`` + sep / sep2 alternately."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    def render(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """The prompt text of ``(role, message)`` pairs; an empty or None message renders as ``role:``."""
        text = self.system + self.sep if self.system else ""
        for position, (role, message) in enumerate(messages):
            if message:
                text += f"{role}: {message}" + (self.sep if position % 2 == 0 else self.sep2)
            else:
                text += f"{role}:"
        return text

    @property
    def answer_separator(self) -> str:
        """What precedes every answer: " ASSISTANT: "."""
        return f"{self.sep}{self.roles[1]}: "


V1 = ConversationTemplate(name="v1", system=V1_SYSTEM_MESSAGE)
MPLUG_OWL2 = ConversationTemplate(name="mplug_owl2", system="")

TEMPLATES = {"v1": V1, "vicuna_v1": V1, "mplug_owl2": MPLUG_OWL2}
"""The original's templates with this separator style ("v0"/"default" use "###" and are not reached by Q-Scorer)."""

TRAINING_VERSIONS = ("v1", "vicuna_v1")
"""Conversation versions whose template the training data pipeline implements (train_lora.sh uses v1)."""

SCORING_PROMPT_KINDS = ("scorer", "eval", "training")


def get_template(version: str) -> ConversationTemplate:
    """The template of a ``--version`` value (the original fell back to vicuna_v1 silently; this raises)."""
    try:
        return TEMPLATES[version]
    except KeyError:
        raise QScorerError(f"unknown conversation version {version!r}; choose one of {sorted(TEMPLATES)}") from None


def build_scoring_prompt(kind: str = "scorer") -> str:
    """The inference prompt: ``kind="scorer"`` (scorer.py, ``score()``), ``"eval"`` (batch evaluation) or
    ``"training"`` (the v1 training template with the image first, cut after the answer prefix)."""
    question = f"{SCORING_QUESTION}\n{DEFAULT_IMAGE_TOKEN}"
    if kind == "scorer":
        return f"USER: {question}\nASSISTANT: {ANSWER_PREFIX}"
    if kind == "eval":
        return MPLUG_OWL2.render([("USER", question), ("ASSISTANT", None)]) + f" {ANSWER_PREFIX}"
    if kind == "training":
        image_first = f"{DEFAULT_IMAGE_TOKEN}\n{SCORING_QUESTION}"
        return V1.render([(V1.roles[0], image_first), (V1.roles[1], None)]) + f" {ANSWER_PREFIX}"
    raise QScorerError(f"unknown scoring prompt kind {kind!r}; choose one of {list(SCORING_PROMPT_KINDS)}")


def scoring_prompt_ids(tokenizer, kind: str = "scorer") -> list[int]:
    """Ids of a scoring prompt, with -200 for the image: on LLaMA-2, 28 ids for "scorer" and "eval",
    59 for "training" (the first 59 ids of a training record answering "... is <scoreN>.")."""
    return tokenizer_image_token(build_scoring_prompt(kind), tokenizer)


def level_word_ids(tokenizer) -> list[int]:
    """Ids of the five level words as answered after :data:`ANSWER_PREFIX` ("... is good."), bad..excellent.

    Each word must be one piece there, and the five must differ: the level-word readouts and losses read one logit
    per level at the position after "is".
    """
    prefix = encode_text(ANSWER_PREFIX, tokenizer, add_bos=False)
    ids = []
    for word in LEVEL_WORDS:
        answer = encode_text(f"{ANSWER_PREFIX} {word}.", tokenizer, add_bos=False)
        pieces = answer[len(prefix) : -1] if answer[: len(prefix)] == prefix else []
        if len(pieces) != 1:
            raise QScorerError(
                f"the tokenizer does not answer the level word {word!r} with one piece after {ANSWER_PREFIX!r}: "
                f"got ids {answer}"
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise QScorerError(f"level words share a piece: {dict(zip(LEVEL_WORDS, ids))}")
    return ids


def place_images_first(conversations: Sequence[dict], n_images: int) -> list[dict]:
    """The training layout of the placeholders: images first in the human turn, then "\\n" + text.

    The original removes the placeholders of every message that has one and puts one placeholder in front of each
    such message. Here the first human message with a placeholder gets ``n_images`` adjacent placeholders (one per
    image or video frame; spliced, that is the same sequence as the original's single placeholder followed by all
    images) and the other messages lose theirs, so placeholders and images always pair up. Returns new message dicts.
    """
    result = []
    placed = False
    for message in conversations:
        value = message["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if not placed and message["from"] == HUMAN:
                value = (DEFAULT_IMAGE_TOKEN * n_images + "\n" + value).strip()
                placed = True
        result.append({**message, "value": value})
    return result


def build_training_prompt(conversations: Sequence[dict], template: ConversationTemplate = V1) -> str:
    """The prompt of a record's ``conversations`` (``from`` human/gpt, ``value``) with ``template``.

    A leading message that is not from the human is dropped; the rest must alternate human / gpt.
    """
    messages = list(conversations)
    if messages and messages[0]["from"] != HUMAN:
        messages = messages[1:]
    roles = {HUMAN: template.roles[0], GPT: template.roles[1]}
    rendered = []
    for position, message in enumerate(messages):
        expected = HUMAN if position % 2 == 0 else GPT
        if message["from"] != expected:
            raise QScorerError(f"conversation message {position} is from {message['from']!r}, expected {expected!r}")
        rendered.append((roles[expected], message["value"]))
    return template.render(rendered)


def score_processor(tokenizer, image_processor=None):
    """The :class:`~qscorer.model.processing.ScoreProcessor` of ``tokenizer``: the ids of every scoring prompt and
    the image preprocessing (``image_processor``, default the CLIP 448 one); ``model.score(images, processor)``."""
    from ..model.processing import ScoreProcessor

    return ScoreProcessor({kind: scoring_prompt_ids(tokenizer, kind) for kind in SCORING_PROMPT_KINDS}, image_processor)
