"""Training (``qscorer train``): the original's flags, model set-up, Trainer, and checkpoints in its LoRA format.

- ``arguments``: :func:`parse_arguments` (the original's ModelArguments / DataArguments / TrainingArguments).
- ``setup``: :func:`build_model`, :func:`lora_target_modules`, :func:`write_base_model`.
- ``data``: :func:`build_training_data` (single / pair items, soft labels).
- ``objectives``: :class:`BatchObjective` (dispatcher loss, pair ranking, soft-label KL, in-level).
- ``sampler`` / ``trainer``: :class:`ModalityLengthGroupedSampler`, :func:`parameter_groups`, :class:`QScorerTrainer`.
- ``saving``: :func:`save_lora_checkpoint`, :func:`load_lora_checkpoint`.
- ``train``: ``qscorer.train.train.train`` and the CLI entry points.

Names are imported lazily (torch, transformers and peft load on first use).
"""

_LAZY = {
    "DataArguments": "arguments",
    "ModelArguments": "arguments",
    "TrainingArguments": "arguments",
    "parse_arguments": "arguments",
    "build_model": "setup",
    "lora_target_modules": "setup",
    "write_base_model": "setup",
    "build_training_data": "data",
    "BatchObjective": "objectives",
    "ModalityLengthGroupedSampler": "sampler",
    "QScorerTrainer": "trainer",
    "parameter_groups": "trainer",
    "load_lora_checkpoint": "saving",
    "save_lora_checkpoint": "saving",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
