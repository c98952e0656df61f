"""mPLUG-Owl2 + Q-Scorer head, with the original's class names.

The first class taken from this package registers the model with transformers' Auto classes (model_type
"mplug_owl2"). Names are imported lazily, so ``qscorer.errors`` (defined in :mod:`.errors`) does not load torch.
"""

_EXPORTS = {
    "MPLUGOwl2Config": "configuration",
    "MplugOwlVisionConfig": "configuration",
    "MplugOwlVisualAbstractorConfig": "configuration",
    "MPLUGOwl2LlamaForCausalLM": "modeling",
    "QScorerCausalLMOutput": "modeling",
    "ScorePrediction": "modeling",
}


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration import MPLUGOwl2Config
    from .modeling import MPLUGOwl2LlamaForCausalLM

    try:
        AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config)
        AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM)
    except ValueError:
        pass  # already registered (e.g. the same classes imported as exported remote code)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    _register_auto_classes()
    for exported, module in _EXPORTS.items():
        globals()[exported] = getattr(importlib.import_module(f".{module}", __name__), exported)
    return globals()[name]


__all__ = sorted(_EXPORTS)
