"""mPLUG-Owl2 + Q-Scorer head, with the original's class names.

Importing this package registers the classes with transformers' Auto classes (model_type "mplug_owl2").
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MPLUGOwl2Config, MplugOwlVisionConfig, MplugOwlVisualAbstractorConfig
from .modeling import MPLUGOwl2LlamaForCausalLM, QScorerCausalLMOutput, ScorePrediction

try:
    AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config)
    AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM)
except ValueError:
    pass  # already registered (e.g. the same classes imported as exported remote code)

__all__ = [
    "MPLUGOwl2Config",
    "MPLUGOwl2LlamaForCausalLM",
    "MplugOwlVisionConfig",
    "MplugOwlVisualAbstractorConfig",
    "QScorerCausalLMOutput",
    "ScorePrediction",
]
