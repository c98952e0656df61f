"""Shared test fixtures: offline mode, and paths into ../shared (tests skip with a reason when it is absent)."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SHARED = Path(os.environ.get("QSCORER_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
PARITY = SHARED / "parity"
GOLDEN = PARITY / "golden"
REFERENCE = SHARED / "reference"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the parity/reference files live in ../shared (set QSCORER_SHARED to move it)")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """``../shared/parity``: tiny checkpoints in the original formats and golden outputs of the original code."""
    return _require(PARITY)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/parity/golden``."""
    return _require(GOLDEN)


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    """The real LLaMA-2 tokenizer (``../shared/reference/llama2-tokenizer``)."""
    return _require(REFERENCE / "llama2-tokenizer")


@pytest.fixture(scope="session")
def parity_images_dir() -> Path:
    """``../shared/parity/images``: boat.jpg, landscape_640x360.jpg, portrait_300x500.png."""
    return _require(PARITY / "images")


@pytest.fixture(scope="session")
def tokenizer(llama_tokenizer_dir):
    """The real LLaMA-2 tokenizer with the score tokens, shared across tests: do not modify it."""
    from qscorer.data import load_tokenizer

    return load_tokenizer(llama_tokenizer_dir)
