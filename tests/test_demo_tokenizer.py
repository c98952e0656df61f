"""The offline demo tokenizer: deterministic, loadable, and LLaMA-2-like where the pipeline relies on it."""

from qscorer.constants import LEVEL_WORDS, SCORE_TOKENS
from qscorer.data import encode_text, load_tokenizer, score_token_ids
from qscorer.data.conversation import scoring_prompt_ids
from qscorer.data.demo_tokenizer import DEMO_VOCAB_SIZE, build_demo_tokenizer


def test_demo_tokenizer_is_deterministic_and_loads_with_score_tokens(tmp_path):
    first = build_demo_tokenizer(tmp_path / "a")
    second = build_demo_tokenizer(tmp_path / "b")
    assert (first / "tokenizer.model").read_bytes() == (second / "tokenizer.model").read_bytes()
    tokenizer = load_tokenizer(first)
    assert tokenizer.vocab_size == DEMO_VOCAB_SIZE and len(tokenizer) == DEMO_VOCAB_SIZE + 5
    assert score_token_ids(tokenizer) == list(range(DEMO_VOCAB_SIZE, DEMO_VOCAB_SIZE + 5))
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        0,
    )


def test_demo_tokenizer_splits_like_llama2_around_score_tokens(tmp_path):
    tokenizer = load_tokenizer(build_demo_tokenizer(tmp_path))
    ids = encode_text("The quality of the image is <score4>.", tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "<s>" and pieces[-4:] == ["▁is", "▁", "<score4>", "."]
    assert ids[-2] == score_token_ids(tokenizer)[SCORE_TOKENS.index("<score4>")]
    for kind in ("eval", "scorer", "training"):
        prompt = scoring_prompt_ids(tokenizer, kind)
        assert prompt.count(-200) == 1 and tokenizer.convert_ids_to_tokens(prompt[-1:]) == ["▁is"]
        assert tokenizer.convert_ids_to_tokens(prompt[prompt.index(-200) + 1 : prompt.index(-200) + 2]) == ["▁"]


def test_level_words_are_single_distinct_pieces(tmp_path):
    tokenizer = load_tokenizer(build_demo_tokenizer(tmp_path))
    first_pieces = [encode_text(f"is {word}", tokenizer, add_bos=False)[1] for word in LEVEL_WORDS]
    assert tokenizer.convert_ids_to_tokens(first_pieces) == [f"▁{word}" for word in LEVEL_WORDS]
