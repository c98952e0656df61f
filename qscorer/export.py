"""Export a merged model as a self-contained folder (the original's scripts/merge_lora_save.py; ``qscorer merge``).

The folder holds safetensors weights, ``config.json`` (with ``score_token_id``, ``score_tokens``,
``deepmlp_hidden_dims`` and an ``auto_map``), the tokenizer with the score tokens, ``preprocessor_config.json`` and
the modeling code, so that plain transformers loads it without qscorer installed::

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.score([Image.open("photo.jpg")])

The LoRA delta is merged in float32 and the result cast to ``--torch-dtype`` once (the original merged in float16).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from .errors import QScorerError

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent

REMOTE_CODE_MODULES = {
    "qscorer.model.configuration": "configuration_mplug_owl2",
    "qscorer.model.modeling": "modeling_mplug_owl2",
    "qscorer.model.attention": "attention",
    "qscorer.model.flash": "flash",
    "qscorer.model.vision": "vision",
    "qscorer.model.abstractor": "abstractor",
    "qscorer.model.llama": "llama",
    "qscorer.model.head": "head",
    "qscorer.data.image": "image",
    "qscorer.data.resample": "resample",
    "qscorer.data.tokenization": "tokenization",
    "qscorer.data.conversation": "conversation",
    "qscorer.constants": "constants",
    "qscorer.errors": "errors",
}
"""Modules the exported model needs, and their file names in the flat remote-code folder."""

AUTO_MAP = {
    "AutoConfig": "configuration_mplug_owl2.MPLUGOwl2Config",
    "AutoModelForCausalLM": "modeling_mplug_owl2.MPLUGOwl2LlamaForCausalLM",
}

_RELATIVE_IMPORT = re.compile(r"^(?P<indent>\s*)from (?P<dots>\.+)(?P<name>[\w.]*) import ", re.MULTILINE)


def _source_file(module: str) -> Path:
    return PACKAGE_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")


def flat_module_source(module: str) -> str:
    """The module's source with every relative import pointing at its flat remote-code file name.

    An import of a module outside ``REMOTE_CODE_MODULES`` is an error (the exported folder would not load).
    """
    package = module.rsplit(".", 1)[0]

    def rewrite(match: re.Match) -> str:
        base = package.rsplit(".", len(match["dots"]) - 1)[0] if len(match["dots"]) > 1 else package
        target = f"{base}.{match['name']}" if match["name"] else base
        if target not in REMOTE_CODE_MODULES:
            raise QScorerError(f"{module} imports {target}, which the exported model folder does not include")
        return f"{match['indent']}from .{REMOTE_CODE_MODULES[target]} import "

    return _RELATIVE_IMPORT.sub(rewrite, _source_file(module).read_text(encoding="utf-8"))


def _with_every_module_imported(source: str) -> str:
    """transformers 4.x copies only the files that the auto_map module imports directly (for a local folder), so the
    exported modeling file gets a direct import of every other exported module."""
    imported = set(re.findall(r"^\s*from \.(\w+) import ", source, flags=re.MULTILINE))
    missing = [name for name in REMOTE_CODE_MODULES.values() if name not in imported | {"modeling_mplug_owl2"}]
    lines = [f"from .{name} import __name__ as _{name}_module  # noqa: E402,F401" for name in missing]
    note = "# Remote code: transformers 4.x copies only the files imported directly by this module.\n"
    return source + "\n\n" + note + "\n".join(lines) + "\n" if lines else source


def write_remote_code(output_dir: str | Path) -> list[Path]:
    """Write the modeling code into ``output_dir`` as flat files; returns their paths."""
    written = []
    for module, name in REMOTE_CODE_MODULES.items():
        source = flat_module_source(module)
        if name == "modeling_mplug_owl2":
            source = _with_every_module_imported(source)
        path = Path(output_dir) / f"{name}.py"
        path.write_text(source, encoding="utf-8")
        written.append(path)
    return written


MODEL_CARD = """---
library_name: transformers
tags:
- image-quality-assessment
- q-scorer
---
# Q-Scorer (merged)

A Q-Scorer image-quality model (mPLUG-Owl2 + score-token regression head) with its LoRA merged, exported by
qscorer. It loads with plain transformers:

```python
from PIL import Image
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
print(model.score([Image.open("photo.jpg")]))  # list of floats, about 1 (bad) .. 5 (excellent)
```
"""


def export_model(
    model,
    tokenizer,
    image_processor,
    output_dir: str | Path,
    *,
    dtype: torch.dtype,
    remote_code: bool = True,
    max_shard_size: str = "5GB",
) -> Path:
    """Save a loaded (merged) model as a self-contained folder in ``dtype``.

    The folder is written under a temporary name next to ``output_dir`` and renamed at the end, so a failed export
    leaves no half-written model behind. ``output_dir`` must be absent or empty.
    """
    from .data.tokenization import save_tokenizer

    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise QScorerError(f"output folder {output} is not empty")
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model.to(dtype)
        config = model.config
        config.vocab_size = model.get_input_embeddings().num_embeddings
        config._name_or_path = ""
        if remote_code:
            config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        save_tokenizer(tokenizer, partial)
        image_processor.save_pretrained(partial)
        if remote_code:
            write_remote_code(partial)
        (partial / "README.md").write_text(MODEL_CARD.replace("{folder}", str(output)), encoding="utf-8")
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("exported %s (%s)", output, str(dtype).removeprefix("torch."))
    return output
