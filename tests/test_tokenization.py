"""Tokenizer loading and exact prompt ids (score tokens, the slow tokenizer's rules, image placeholders) on
transformers 4.57 and 5.x."""

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from qscorer.constants import SCORE_TOKENS
from qscorer.data import (
    build_scoring_prompt,
    encode_text,
    load_tokenizer,
    save_tokenizer,
    score_token_ids,
    scoring_prompt_ids,
    tokenizer_image_token,
)
from qscorer.errors import QScorerError
from qscorer.model.constants import IMAGE_TOKEN_INDEX

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@pytest.fixture
def golden_tokens(golden_dir):
    return json.loads((golden_dir / "tokens.json").read_text())


def test_score_tokens_are_added_as_specials(tokenizer, golden_tokens):
    assert len(tokenizer) == golden_tokens["len_tokenizer"] == 32005
    assert dict(zip(SCORE_TOKENS, score_token_ids(tokenizer))) == golden_tokens["score_token_ids"]
    assert all(tokenizer.added_tokens_decoder[index].special for index in range(32000, 32005))
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 2048
    assert tokenizer.convert_ids_to_tokens([338, 29871, 32003]) == ["▁is", "▁", "<score4>"]
    assert tokenizer.decode([450, 11029, 338], skip_special_tokens=True) == "The quality is"


def test_scoring_prompts_give_the_original_ids(tokenizer, golden_tokens):
    assert build_scoring_prompt("scorer") == golden_tokens["scorer_prompt"]
    assert build_scoring_prompt("eval") == golden_tokens["iqa_eval_prompt"]
    assert scoring_prompt_ids(tokenizer, "scorer") == golden_tokens["scorer_prompt_ids"]
    assert scoring_prompt_ids(tokenizer, "scorer") == golden_tokens["score_method_prompt_ids"]
    assert scoring_prompt_ids(tokenizer, "eval") == golden_tokens["iqa_eval_prompt_ids"]
    pieces = tokenizer.convert_ids_to_tokens([i for i in scoring_prompt_ids(tokenizer, "eval") if i >= 0])
    assert pieces == [p for p in golden_tokens["pieces_iqa"] if p != "<IMAGE>"]


def test_training_scoring_prompt_is_the_prefix_of_the_original_training_ids(tokenizer, golden_dir):
    # The original's training records end "... ▁is ▁ <scoreN> . </s>": the prompt is what precedes the lone "▁".
    samples = json.loads((golden_dir / "training.json").read_text())["preprocessing"]["samples"]
    ids = scoring_prompt_ids(tokenizer, "training")
    assert len(ids) == 59 and ids[-1] == 338 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert all(sample["input_ids"][:-4] == ids for sample in samples)
    assert build_scoring_prompt("training") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <|image|>\nHow would you rate the quality of "
        "this image? ASSISTANT: The quality of the image is"
    )


def test_probes(tokenizer, golden_tokens):
    for text, ids in golden_tokens["probes"].items():
        assert encode_text(text, tokenizer) == ids, text


def test_transformers5_trap_is_avoided(tokenizer):
    # The chunk after the placeholder starts with a space: the original emits a lone "▁" (29871) first.
    assert encode_text(" ASSISTANT: The", tokenizer) == [1, 29871, 319, 1799, 9047, 13566, 29901, 450]
    if TRANSFORMERS_5:
        assert tokenizer(" ASSISTANT: The").input_ids == [1, 319, 1799, 9047, 13566, 29901, 450]


@pytest.mark.skipif(TRANSFORMERS_5, reason="the slow sentencepiece LlamaTokenizer is the oracle; transformers 4.x only")
def test_same_ids_as_the_slow_llama_tokenizer(tokenizer, llama_tokenizer_dir):
    reference = transformers.LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir), legacy=False)
    reference.add_tokens(list(SCORE_TOKENS), special_tokens=True)
    pieces = list("ab ▁\n.:?é你🤖") + ["<s>", "</s>", "<score3>", "<unk>", " ASSISTANT: ", "USER:", "  "]
    generator = random.Random(0)
    texts = ["", " hi", "▁is", "<score4> hi", "a<unk>b", "x <score1> <score2> y"]
    texts += ["".join(generator.choice(pieces) for _ in range(generator.randint(1, 10))) for _ in range(300)]
    for text in texts:
        assert encode_text(text, tokenizer) == reference(text).input_ids, repr(text)


def test_tokenizer_image_token_rules(tokenizer):
    assert tokenizer_image_token("hello world", tokenizer) == [1, 22172, 3186]
    assert tokenizer_image_token("hello<|image|><|image|> world", tokenizer) == [1, 22172, -200, -200, 29871, 3186]
    # A prompt that starts with the placeholder keeps each chunk's BOS, as in the original.
    assert tokenizer_image_token("<|image|>hello", tokenizer) == [-200, 1, 22172]
    assert tokenizer_image_token("hi<|image|>", tokenizer, image_token_index=-7) == [1, 7251, -7]
    tensor = tokenizer_image_token(build_scoring_prompt("scorer"), tokenizer, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor[15].item() == IMAGE_TOKEN_INDEX and tensor.shape == (28,)
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("hi", tokenizer, return_tensors="np")


def test_preprocessor_folder_with_the_base_tokenizer_model(tokenizer, llama_tokenizer_dir):
    loaded = load_tokenizer(REPO / "preprocessor", base_model_path=llama_tokenizer_dir, model_max_length=512)
    assert len(loaded) == 32005 and loaded.pad_token_id == 0 and loaded.model_max_length == 512
    assert scoring_prompt_ids(loaded, "eval") == scoring_prompt_ids(tokenizer, "eval")


def test_preprocessor_folder_alone_explains_where_tokenizer_model_is():
    with pytest.raises(QScorerError, match=r"no tokenizer\.model in .*preprocessor.*base_model_path"):
        load_tokenizer(REPO / "preprocessor")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(QScorerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(QScorerError, match=f"{tmp_path} has no tokenizer.model"):
        load_tokenizer(REPO / "preprocessor", base_model_path=tmp_path)


def test_different_tokenizer_models_are_refused(tmp_path, llama_tokenizer_dir):
    (tmp_path / "tokenizer.model").write_bytes(b"not the same model")
    with pytest.raises(QScorerError, match="differs from"):
        load_tokenizer(tmp_path, base_model_path=llama_tokenizer_dir)


def test_merged_checkpoint_folder_already_has_the_score_tokens(parity_dir, tokenizer):
    loaded = load_tokenizer(parity_dir / "qscorer_merged")
    assert len(loaded) == 32005 and score_token_ids(loaded) == [32000, 32001, 32002, 32003, 32004]
    assert scoring_prompt_ids(loaded) == scoring_prompt_ids(tokenizer)


def test_save_writes_the_original_checkpoint_format(tmp_path, tokenizer, parity_dir):
    files = save_tokenizer(tokenizer, tmp_path / "saved")
    merged = parity_dir / "qscorer_merged"
    names = ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model"]
    assert sorted(Path(name).name for name in files) == sorted(names)
    for name in names[:3]:
        assert json.loads((tmp_path / "saved" / name).read_text()) == json.loads((merged / name).read_text()), name
    assert (tmp_path / "saved" / "tokenizer.model").read_bytes() == (merged / "tokenizer.model").read_bytes()
    reloaded = load_tokenizer(tmp_path / "saved")
    assert encode_text("is <score4>.", reloaded) == [1, 338, 29871, 32003, 29889]
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert len(auto) == 32005 and auto.pad_token_id == 0 and auto("is <score4>").input_ids == [1, 338, 29871, 32003]


def test_save_refuses_a_tokenizer_without_score_tokens(tmp_path, llama_tokenizer_dir):
    plain = transformers.LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir))
    with pytest.raises(QScorerError, match="score tokens got ids"):
        save_tokenizer(plain, tmp_path)


def test_a_folder_with_other_added_tokens_is_refused(tmp_path, llama_tokenizer_dir):
    other = transformers.LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir))
    other.add_tokens(["<extra>"], special_tokens=True)
    other.save_pretrained(str(tmp_path))
    shutil.copyfile(llama_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(QScorerError, match=r"score tokens got ids \[32001"):
        load_tokenizer(tmp_path)


def test_pickled_tokenizer_still_encodes_exactly(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert scoring_prompt_ids(clone, "eval") == scoring_prompt_ids(tokenizer, "eval")


def test_tokenizer_loaded_elsewhere_uses_its_own_tokenizer_model(llama_tokenizer_dir, golden_tokens):
    plain = transformers.LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir))
    plain.add_tokens(list(SCORE_TOKENS), special_tokens=True)
    assert scoring_prompt_ids(plain, "eval") == golden_tokens["iqa_eval_prompt_ids"]
