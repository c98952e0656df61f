"""The original's checkpoint files in one place: names, key prefixes, weight-file lookup, lazy readers, writing.

Two kinds of checkpoint folder exist, told apart by their files (never by the folder's name):

- a LoRA checkpoint, the original's training output: ``adapter_config.json`` (peft's LoRA config),
  ``adapter_model.{safetensors,bin}`` (the LoRA tensors, ``base_model.model.<module>.lora_A.weight`` /
  ``lora_B.weight``) and ``non_lora_trainables.{safetensors,bin}`` (other trained tensors under
  ``base_model.model.<parameter>``; the published checkpoint holds EVERY parameter of the model there, in bf16),
  plus ``config.json``;
- a full model folder (a base model such as ``mplug-owl2-llama2-7b``, or a merged checkpoint): ``config.json`` and
  ``model.safetensors``, ``pytorch_model.bin`` or a sharded index of either.

Tensors are read lazily: a :class:`TensorFile` maps the file (``safetensors``, or a zip-format ``torch.save`` file
read with ``torch.load(mmap=True, weights_only=True)``) and copies one tensor at a time, so loading a model never
holds a whole checkpoint in memory. Pickled ``.bin`` files are always read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from .errors import QScorerError

CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_STEM = "adapter_model"
NON_LORA_STEM = "non_lora_trainables"
PEFT_PREFIX = "base_model.model."
"""Prefix of a PeftModel's parameter names: ``base_model.model.<name in the model>``."""
ADAPTER_NAME = "default"
"""peft's adapter name, which the original's files leave out of the LoRA tensor names (peft 0.4.0 did)."""
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
ADDED_TOKENS_FILE = "added_tokens.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

SUFFIXES = (".safetensors", ".bin")
"""Weight formats in order of preference when a folder holds both."""
MODEL_WEIGHTS = {".safetensors": "model", ".bin": "pytorch_model"}
"""Stem of a full model's weights per format (``model.safetensors`` / ``pytorch_model.bin`` and their indexes)."""
INDEX_SUFFIX = ".index.json"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def weights_file(folder: str | os.PathLike, stem: str) -> Path | None:
    """``<stem>.safetensors`` or ``<stem>.bin`` in ``folder`` (safetensors first), or None."""
    return next((Path(folder) / f"{stem}{s}" for s in SUFFIXES if (Path(folder) / f"{stem}{s}").is_file()), None)


def model_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a full model folder: one file, or the shards its index names (safetensors first).

    An index that names a missing shard is an error naming both.
    """
    folder = Path(folder)
    for suffix, stem in MODEL_WEIGHTS.items():
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{suffix}{INDEX_SUFFIX}"
        if index.is_file():
            shards = sorted(set(read_index(index).values()))
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise QScorerError(f"{index} names shard {missing[0]}, which is missing from {folder}")
            return [folder / name for name in shards]
    return []


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise QScorerError(f"{path} is not a checkpoint index (a JSON object with a weight_map): {error}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise QScorerError(f"{path}: weight_map must map tensor names to shard file names")
    return weight_map


def checkpoint_kind(folder: str | os.PathLike) -> str:
    """ "lora" or "full", from the files in ``folder``; a QScorerError names what is missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QScorerError(f"model folder {folder} does not exist")
    if (folder / ADAPTER_CONFIG).is_file():
        for stem in (ADAPTER_STEM, NON_LORA_STEM):
            if weights_file(folder, stem) is None:
                raise QScorerError(f"LoRA folder {folder} has {ADAPTER_CONFIG} but no {stem}.safetensors or {stem}.bin")
        return "lora"
    if (folder / CONFIG_FILE).is_file() and model_weight_files(folder):
        return "full"
    raise QScorerError(
        f"{folder} is neither a LoRA checkpoint ({ADAPTER_CONFIG} + {ADAPTER_STEM}.bin + {NON_LORA_STEM}.bin) "
        f"nor a model folder ({CONFIG_FILE} + model.safetensors or pytorch_model.bin, or a sharded index)"
    )


def files_to_fetch(names: Iterable[str]) -> list[str]:
    """The files of a repository listing that loading needs: the checkpoint's weights in one format, its configs,
    the tokenizer and the image-processor config (a Hub repository may carry other files too)."""
    names = set(names)
    configs = (CONFIG_FILE, PREPROCESSOR_FILE, *TOKENIZER_FILES, ADDED_TOKENS_FILE)
    wanted = [name for name in configs if name in names]
    if ADAPTER_CONFIG in names:
        wanted.append(ADAPTER_CONFIG)
        for stem in (ADAPTER_STEM, NON_LORA_STEM):
            wanted += [f"{stem}{s}" for s in SUFFIXES if f"{stem}{s}" in names][:1]
        return wanted
    for suffix, stem in MODEL_WEIGHTS.items():
        if f"{stem}{suffix}" in names:
            return [*wanted, f"{stem}{suffix}"]
        if f"{stem}{suffix}{INDEX_SUFFIX}" in names:
            shard = re.compile(rf"{re.escape(stem)}-\d+-of-\d+{re.escape(suffix)}")
            return [*wanted, f"{stem}{suffix}{INDEX_SUFFIX}", *sorted(n for n in names if shard.fullmatch(n))]
    return wanted


# ---------------------------------------------------------------------------------------------------- tensor names


def model_key(checkpoint_key: str) -> str:
    """A checkpoint or PeftModel name as a name in the model: without ``base_model.model.`` and ``.base_layer``."""
    name = checkpoint_key[len(PEFT_PREFIX) :] if checkpoint_key.startswith(PEFT_PREFIX) else checkpoint_key
    return name.replace(".base_layer.", ".")


def checkpoint_key(peft_name: str) -> str:
    """A PeftModel parameter name as the original saved it: without ``.base_layer`` and the adapter name."""
    name = peft_name.replace(".base_layer.", ".")
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.{ADAPTER_NAME}.", f".{part}.")
    return name


def lora_module_and_part(key: str) -> tuple[str, str] | None:
    """``(module name in the model, "A" or "B")`` of a LoRA tensor name, or None for another tensor."""
    match = _LORA_KEY.match(model_key(key))
    return (match["module"], match["part"]) if match else None


def unwrap_peft(model):
    """The model inside a PeftModel, or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# ---------------------------------------------------------------------------------------------------- reading


class TensorFile(Mapping):
    """The tensors of one weights file, read lazily (memory-mapped); keys as stored in the file.

    ``file[key]`` returns a CPU tensor whose pages are read from disk when touched; ``bytes_read`` adds up the
    sizes of the tensors handed out. Unreadable or truncated files raise a QScorerError naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bytes_read = 0
        self._tensors: dict[str, torch.Tensor] | None = None
        self._safetensors = None
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._safetensors = safe_open(str(self.path), framework="pt", device="cpu")
                self._keys = list(self._safetensors.keys())
            else:
                self._tensors = _load_pickled(self.path)
                if not isinstance(self._tensors, dict):
                    raise QScorerError(f"{self.path} holds a {type(self._tensors).__name__}, not a dict of tensors")
                self._keys = list(self._tensors)
        except QScorerError:
            raise
        except FileNotFoundError:
            raise QScorerError(f"weights file {self.path} does not exist") from None
        except Exception as error:
            raise QScorerError(
                f"cannot read {self.path} as a weights-only checkpoint (truncated or not a "
                f"checkpoint?): {_first_line(error)}"
            ) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            tensor = self._safetensors.get_tensor(key) if self._safetensors is not None else self._tensors[key]
        except KeyError:
            raise
        except Exception as error:
            raise QScorerError(f"cannot read {key} from {self.path} (truncated?): {_first_line(error)}") from None
        if not isinstance(tensor, torch.Tensor):
            raise QScorerError(f"{self.path}: {key} is a {type(tensor).__name__}, not a tensor")
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _load_pickled(path: Path):
    """``torch.load`` memory-mapped; files in the legacy (pre-zip) format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "zipfile" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) weights file, copied into memory."""
    file = TensorFile(path)
    return {key: file[key].clone() for key in file}


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------------- writing


def write_tensors(tensors: dict[str, torch.Tensor], folder: Path, stem: str, safe_serialization: bool) -> Path:
    """Write ``<stem>.safetensors`` or ``<stem>.bin`` (``torch.save``) and remove a stale file of the other format,
    which a loader would otherwise prefer."""
    suffix, stale = (".safetensors", ".bin") if safe_serialization else (".bin", ".safetensors")
    path = folder / f"{stem}{suffix}"
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
    (folder / f"{stem}{stale}").unlink(missing_ok=True)
    return path
