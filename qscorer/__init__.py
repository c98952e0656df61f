"""qscorer: Q-Scorer image quality assessment on current PyTorch and transformers.

Public API (imported lazily, so ``import qscorer`` is cheap):

- ``qscorer.Scorer``: score images with a checkpoint (paths, PIL images or pixel tensors).
- ``qscorer.load_pretrained_model``: load a base + LoRA, merged or full checkpoint like the original builder.
"""

__version__ = "0.1.0"

_LAZY = {
    "Scorer": "qscorer.scoring",
    "load_pretrained_model": "qscorer.loading",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qscorer' has no attribute {name!r}")


__all__ = ["Scorer", "load_pretrained_model", "__version__"]
