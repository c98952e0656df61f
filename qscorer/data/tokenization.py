"""The LLaMA-2 tokenizer with the five score tokens, and prompt encoding with the original's exact ids.

The original tokenized with transformers 4.36's slow (sentencepiece) ``LlamaTokenizer`` and ``legacy=False``.
transformers 5 only ships a tokenizers-backed ``LlamaTokenizer``, which encodes a chunk that starts with
a space (" ASSISTANT: ...") without the lone "▁" (29871) the slow tokenizer emits, so the batch-evaluation prompt
would come out one id short. Prompt text is therefore encoded here with sentencepiece itself, following the slow
tokenizer's rules (:class:`SentencePieceTextEncoder`), on every transformers version. The transformers tokenizer
object is still what :func:`load_tokenizer` returns: ``len()``, ``decode``, ``convert_ids_to_tokens``,
``save_pretrained`` and ``pad_token_id`` are its own. Encode prompts with :func:`encode_text` /
:func:`tokenizer_image_token`, not with ``tokenizer(text)``, whose ids depend on the transformers version; save with
:func:`save_tokenizer` to get a folder every transformers version (and the original code) can load.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

from ..constants import DEFAULT_IMAGE_TOKEN, SCORE_TOKENS
from ..errors import QScorerError
from ..model.constants import IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)

SPIECE_UNDERLINE = "▁"
SENTENCEPIECE_FILE = "tokenizer.model"
LLAMA_BASE_VOCAB_SIZE = 32000
LLAMA_SPECIAL_TOKEN_IDS = {"unk": 0, "bos": 1, "eos": 2}

_ENCODER_ATTRIBUTE = "_qscorer_text_encoder"


class SentencePieceTextEncoder:
    """Encodes text like transformers' slow ``LlamaTokenizer`` with ``legacy=False``, without BOS.

    The rules: the sentencepiece model runs with ``add_dummy_prefix`` disabled; a literal "▁" in the text becomes a
    space and one "▁" is prepended to the whole text; the text is split on the added tokens (``</s>``,
    ``<scoreN>``, ...); a text segment that starts with a space or "▁" is encoded behind a temporary ``<unk>``
    prefix that is then removed, so its leading space survives as "▁"; other segments are encoded as they are; a
    leading lone "▁" directly followed by a special token is dropped.
    """

    def __init__(self, model_bytes: bytes, unk_token: str = "<unk>"):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        self.model_bytes = model_bytes
        """The unmodified ``tokenizer.model`` file."""
        self._unk_token = unk_token
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_bytes)
        proto.normalizer_spec.add_dummy_prefix = False
        self._processor = sentencepiece.SentencePieceProcessor()
        self._processor.LoadFromSerializedProto(proto.SerializeToString())
        self._unk_prefix_length = len(self._processor.encode(unk_token))
        self.lone_space_id = self._processor.piece_to_id(SPIECE_UNDERLINE)

    @classmethod
    def from_file(cls, path: str | os.PathLike, unk_token: str = "<unk>") -> SentencePieceTextEncoder:
        return cls(Path(path).read_bytes(), unk_token)

    def __reduce__(self):
        # Pickled (DataLoader workers) as its constructor arguments; the processor is rebuilt from them.
        return type(self), (self.model_bytes, self._unk_token)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str, added_tokens: dict[str, int], special_tokens: frozenset[str]) -> list[int]:
        """Ids of ``text`` (no BOS). ``added_tokens`` maps each added token's text to its id."""
        if not text:
            return []
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        ids: list[int] = []
        second_is_special = False
        segments = _added_token_pattern(tuple(added_tokens)).split(text) if added_tokens else [text]
        for segment in segments:
            if segment in added_tokens:
                if len(ids) == 1:
                    second_is_special = segment in special_tokens
                ids.append(added_tokens[segment])
            elif segment:
                ids.extend(self._encode_segment(segment))
        if len(ids) > 1 and ids[0] == self.lone_space_id and second_is_special:
            del ids[0]
        return ids

    def _encode_segment(self, segment: str) -> list[int]:
        if segment.startswith((SPIECE_UNDERLINE, " ")):
            return self._processor.encode(self._unk_token + segment)[self._unk_prefix_length :]
        return self._processor.encode(segment)


@functools.lru_cache(maxsize=16)
def _added_token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    # Longest first, so that at each position the longest added token wins (like transformers' trie).
    alternatives = "|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True))
    return re.compile(f"({alternatives})")


def _added_tokens(tokenizer) -> tuple[dict[str, int], frozenset[str]]:
    """The tokenizer's added tokens (text -> id) and which of them are special."""
    decoder = tokenizer.added_tokens_decoder
    for token in decoder.values():
        if token.lstrip or token.rstrip or token.single_word:
            raise QScorerError(
                f"added token {token.content!r} of tokenizer {tokenizer.name_or_path!r} strips spaces or is "
                "single-word; qscorer's prompt encoding supports only plain added tokens (as LLaMA-2 has)"
            )
    added = {token.content: index for index, token in decoder.items()}
    special = frozenset(token.content for token in decoder.values() if token.special)
    return added, special | frozenset(tokenizer.all_special_tokens)


def _sentencepiece_file_of(tokenizer) -> Path:
    candidates = [getattr(tokenizer, "vocab_file", None)]
    if tokenizer.name_or_path:
        candidates.append(os.path.join(tokenizer.name_or_path, SENTENCEPIECE_FILE))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    raise QScorerError(
        f"tokenizer {tokenizer.name_or_path!r} has no {SENTENCEPIECE_FILE} on disk, which qscorer needs to encode "
        "prompts exactly; load it with qscorer.data.load_tokenizer(<folder with tokenizer.model>)"
    )


def text_encoder(tokenizer) -> SentencePieceTextEncoder:
    """The exact encoder attached to ``tokenizer`` (created from its ``tokenizer.model`` on first use)."""
    encoder = getattr(tokenizer, _ENCODER_ATTRIBUTE, None)
    if encoder is not None:
        return encoder
    described = f"tokenizer {tokenizer.name_or_path!r}: its {SENTENCEPIECE_FILE}"
    return _attach_encoder(tokenizer, _sentencepiece_file_of(tokenizer), described)


def _attach_encoder(tokenizer, path: Path, described: str) -> SentencePieceTextEncoder:
    """The encoder of the sentencepiece model ``path``, attached to ``tokenizer``; ``described`` names the file in
    the error raised when its vocabulary size is not the tokenizer's."""
    encoder = SentencePieceTextEncoder.from_file(path, str(tokenizer.unk_token))
    if encoder.vocab_size != tokenizer.vocab_size:
        raise QScorerError(f"{described} has {encoder.vocab_size} pieces but the tokenizer has {tokenizer.vocab_size}")
    setattr(tokenizer, _ENCODER_ATTRIBUTE, encoder)
    return encoder


def encode_text(text: str, tokenizer, *, add_bos: bool = True) -> list[int]:
    """Ids of ``text`` exactly as the original's slow LlamaTokenizer (legacy=False) gives them, BOS first."""
    added, special = _added_tokens(tokenizer)
    ids = text_encoder(tokenizer).encode(text, added, special)
    return [tokenizer.bos_token_id, *ids] if add_bos else ids


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Ids of ``prompt`` with ``image_token_index`` (-200) for each ``<|image|>`` placeholder, like the original.

    Every text chunk between placeholders is encoded on its own (with BOS); the sequence keeps one BOS at the start,
    the chunks lose theirs, and each placeholder contributes one ``image_token_index``. If the prompt starts with a
    placeholder, the chunks keep their BOS, as in the original. ``return_tensors="pt"`` gives a 1-D LongTensor.
    """
    chunks = [encode_text(chunk, tokenizer) if chunk else [] for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    starts_with_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    ids = [chunks[0][0]] if starts_with_bos else []
    skip = 1 if starts_with_bos else 0
    for position, chunk in enumerate(chunks):
        if position:
            ids.append(image_token_index)
        ids.extend(chunk[skip:])
    if return_tensors is None:
        return ids
    if return_tensors == "pt":
        import torch

        return torch.tensor(ids, dtype=torch.long)
    raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")


def score_token_ids(tokenizer) -> list[int]:
    """Ids of ``<score1>`` .. ``<score5>``, in that order (32000 .. 32004 on LLaMA-2)."""
    return tokenizer.convert_tokens_to_ids(list(SCORE_TOKENS))


def _find_sentencepiece_model(folder: Path, base_model_path) -> Path:
    own = folder / SENTENCEPIECE_FILE
    base = Path(base_model_path) / SENTENCEPIECE_FILE if base_model_path is not None else None
    if base is not None and not base.is_file():
        raise QScorerError(f"base model folder {base_model_path} has no {SENTENCEPIECE_FILE}")
    if own.is_file() and base is not None and own.read_bytes() != base.read_bytes():
        raise QScorerError(
            f"{own} differs from {base}: the tokenizer folder and the base model must use the same LLaMA-2 tokenizer"
        )
    if own.is_file():
        return own
    if base is not None:
        return base
    raise QScorerError(
        f"no {SENTENCEPIECE_FILE} in {folder}: the LLaMA-2 sentencepiece model ships with the base model "
        "(e.g. mplug-owl2-llama2-7b/tokenizer.model), not with the preprocessor folder; pass the base model folder "
        "as base_model_path= (CLI: --model-base), or use a folder that contains tokenizer.model"
    )


def load_tokenizer(path: str | os.PathLike, *, base_model_path: str | os.PathLike | None = None,
                   model_max_length: int | None = None):
    """Load the LLaMA-2 tokenizer of a model or preprocessor folder and add the five score tokens.

    ``path`` holds the tokenizer configs (``tokenizer_config.json``, ``special_tokens_map.json``) and usually
    ``tokenizer.model``; a preprocessor folder (such as the repository's ``preprocessor/``) has no
    ``tokenizer.model``, which then comes from ``base_model_path`` (the base model folder every user has). When both
    folders have one, they must be identical (the original assumed so without checking).

    Returns the transformers ``LlamaTokenizer`` (slow on transformers 4.x, like the original; the only one on 5.x)
    with ``<score1>`` .. ``<score5>`` added as special tokens (ids 32000 .. 32004, len 32005), pad = unk (id 0),
    right padding, and the exact prompt encoder of :func:`encode_text` attached.
    """
    from transformers import LlamaTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise QScorerError(f"tokenizer folder {folder} does not exist")
    sentencepiece_model = _find_sentencepiece_model(folder, base_model_path)
    options = {"vocab_file": str(sentencepiece_model), "legacy": False, "padding_side": "right"}
    if model_max_length is not None:
        options["model_max_length"] = model_max_length
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), **options)
    tokenizer.add_tokens(list(SCORE_TOKENS), special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token
    _check_llama_tokenizer(tokenizer, folder)
    _attach_encoder(tokenizer, sentencepiece_model, str(sentencepiece_model))
    logger.debug("loaded tokenizer from %s (sentencepiece model %s)", folder, sentencepiece_model)
    return tokenizer


def _check_llama_tokenizer(tokenizer, folder: Path) -> None:
    """A LLaMA-style sentencepiece tokenizer: ids 0/1/2 = unk/bos/eos and the five score tokens right after the base
    vocabulary (32000..32004 for LLaMA-2; other sizes are accepted for tiny and demo models)."""
    found = {"unk": tokenizer.unk_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    if found != LLAMA_SPECIAL_TOKEN_IDS:
        raise QScorerError(
            f"{folder} is not a LLaMA-style tokenizer: special ids {found}, expected {LLAMA_SPECIAL_TOKEN_IDS}"
        )
    base = tokenizer.vocab_size
    expected = list(range(base, base + len(SCORE_TOKENS)))
    if score_token_ids(tokenizer) != expected or len(tokenizer) != expected[-1] + 1:
        raise QScorerError(
            f"tokenizer in {folder}: score tokens got ids {score_token_ids(tokenizer)} and {len(tokenizer)} tokens "
            f"in all; expected ids {expected} and {expected[-1] + 1} tokens (does the folder add other tokens?)"
        )
    if base != LLAMA_BASE_VOCAB_SIZE:
        logger.info("%s: a %d-piece vocabulary, not LLaMA-2's (fine for tiny models)", folder, base)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> list[str]:
    """Write a :func:`load_tokenizer` tokenizer in the format of the original checkpoints.

    The files are those of the original merged checkpoint: ``tokenizer.model``, ``tokenizer_config.json``,
    ``special_tokens_map.json`` and ``added_tokens.json``. Such a folder loads with :func:`load_tokenizer`, with
    ``AutoTokenizer`` on transformers 4.x and 5.x, and with the original code. (``save_pretrained`` on transformers 5
    writes ``tokenizer.json`` without ``tokenizer.model``, and a ``tokenizer_config.json`` that 4.x cannot read.)
    """
    directory = Path(directory)
    _check_llama_tokenizer(tokenizer, directory)
    directory.mkdir(parents=True, exist_ok=True)
    score_tokens = dict(zip(SCORE_TOKENS, score_token_ids(tokenizer)))
    special = {"<unk>": LLAMA_SPECIAL_TOKEN_IDS["unk"], "<s>": LLAMA_SPECIAL_TOKEN_IDS["bos"],
               "</s>": LLAMA_SPECIAL_TOKEN_IDS["eos"], **score_tokens}

    def plain(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(index): {**plain(content), "special": True} for content, index in special.items()},
        "additional_special_tokens": list(SCORE_TOKENS),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": tokenizer.model_max_length,
        "pad_token": "<unk>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_tokens_map = {
        "additional_special_tokens": [plain(content) for content in SCORE_TOKENS],
        **{name: plain(content) for name, content in
           (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<unk>"), ("unk_token", "<unk>"))},
    }
    contents = {
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_tokens_map,
        "added_tokens.json": score_tokens,
    }
    files = []
    for name, content in contents.items():
        text = json.dumps(content, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        (directory / name).write_text(text, encoding="utf-8")
        files.append(str(directory / name))
    (directory / SENTENCEPIECE_FILE).write_bytes(text_encoder(tokenizer).model_bytes)
    files.append(str(directory / SENTENCEPIECE_FILE))
    return files
