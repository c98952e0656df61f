"""Templates, the training layout of image placeholders, and the original's prompt strings."""

import pytest

from qscorer.data import (
    ConversationTemplate,
    build_scoring_prompt,
    build_training_prompt,
    get_template,
    place_images_first,
)
from qscorer.errors import QScorerError

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
QUESTION = "How would you rate the quality of this image?"


def test_scoring_prompts():
    assert build_scoring_prompt() == build_scoring_prompt("scorer") == (
        f"USER: {QUESTION}\n<|image|>\nASSISTANT: The quality of the image is"
    )
    assert build_scoring_prompt("eval") == f"USER: {QUESTION}\n<|image|> ASSISTANT: The quality of the image is"
    with pytest.raises(QScorerError, match="'train'.*scorer.*eval"):
        build_scoring_prompt("train")


def test_v1_training_prompt_moves_the_image_first():
    record = [
        {"from": "human", "value": f"{QUESTION}\n<|image|>"},
        {"from": "gpt", "value": "The quality of the image is <score4>."},
    ]
    prompt = build_training_prompt(place_images_first(record, 1))
    assert prompt == f"{SYSTEM} USER: <|image|>\n{QUESTION} ASSISTANT: The quality of the image is <score4>.</s>"
    assert record[0]["value"] == f"{QUESTION}\n<|image|>"  # the record itself is not modified


def test_place_images_first_puts_one_placeholder_per_image_in_the_first_message():
    record = [
        {"from": "gpt", "value": "Look: <|image|>"},
        {"from": "human", "value": " Compare <|image|> and <|image|> "},
        {"from": "gpt", "value": "Fine."},
        {"from": "human", "value": "<|image|>"},
    ]
    placed = place_images_first(record, 3)
    values = [message["value"] for message in placed]
    assert values == ["Look:", "<|image|><|image|><|image|>\nCompare  and", "Fine.", ""]
    assert place_images_first([{"from": "human", "value": "<|image|>"}], 1)[0]["value"] == "<|image|>"


def test_training_prompt_drops_a_leading_gpt_message_and_renders_multi_round():
    messages = [
        {"from": "gpt", "value": "ignored"},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"},
    ]
    assert build_training_prompt(messages) == f"{SYSTEM} USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    with pytest.raises(QScorerError, match="message 1 is from 'human', expected 'gpt'"):
        build_training_prompt([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


def test_templates():
    assert get_template("vicuna_v1") is get_template("v1")
    owl = get_template("mplug_owl2")
    assert owl.render([("USER", "hi"), ("ASSISTANT", None)]) == "USER: hi ASSISTANT:"
    assert owl.render([("USER", "hi"), ("ASSISTANT", "")]) == "USER: hi ASSISTANT:"
    assert get_template("v1").answer_separator == " ASSISTANT: "
    custom = ConversationTemplate(name="x", system="S", roles=("H", "B"), sep="|", sep2="#")
    assert custom.render([("H", "a"), ("B", "b")]) == "S|H: a|B: b#"
    with pytest.raises(QScorerError, match="unknown conversation version 'v0'"):
        get_template("v0")
