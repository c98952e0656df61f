"""Configuration classes of mPLUG-Owl2 / Q-Scorer.

The class and ``model_type`` names are the original's, so ``config.json`` files written by the original code load
here and ours load there. The defaults are the 7B model (MAGAer13/mplug-owl2-llama2-7b).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

DEFAULT_DEEPMLP_HIDDEN_DIMS = [2048, 1024]

SCORE_RANGE = (0.0, 5.0)
"""The head's predictions are clamped to this range in the training loss and (by default) when scoring."""

OBJECTIVE_DEFAULTS = {
    "weight_desp": 1.0,
    "weight_next_token": 1.0,
    "weight_rank": 1.0,
    "weight_soft_kl": 0.0,
    "weight_in_level": 0.0,
    "soft_kl_closed_set": False,
    "continuous_rating_loss": True,
    "binary_rating_loss": "fidelity",
    "closeset_rating_loss": False,
    "use_fix_std": True,
    "detach_pred_std": False,
    "rank_score_source": "tokens",
    "rating_tokens": "score_tokens",
}
"""The training objective's settings and the value each takes when a config does not record it (the training flags
start from these values too). A batch's loss is ``weight_desp`` x the loss of its description records +
``weight_next_token`` x the loss of its score records (each = cross-entropy + the head's squared error), plus, on
score records, ``weight_soft_kl`` x the soft-label KL (over the five score tokens with ``soft_kl_closed_set``, else
DeQA's full-vocabulary form) and ``weight_in_level`` x DeQA's in-level loss; pair batches add ``weight_rank`` x a
ranking loss between the halves (Thurstone fidelity with ``continuous_rating_loss``, else ``binary_rating_loss``
"bce" / "fidelity"; scores from the five score tokens only with ``closeset_rating_loss``; unit stds with
``use_fix_std``, else predicted ones, detached with ``detach_pred_std``; ``rank_score_source`` "tokens" (expected
level) or "head"). ``rating_tokens``: the five tokens the soft-label, in-level and token-based ranking terms read,
the score tokens or, for answers like "... is good." (Q-Align / DeQA-Score's), the level words ("level_words")."""

TRAINING_FIELDS = (
    *OBJECTIVE_DEFAULTS,
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tune_visual_abstractor",
    "freeze_vision_model",
    "visual_abstractor_lr",
)
"""The config fields that training writes (keyword arguments of :class:`MPLUGOwl2Config`, None when not given)."""


VISION_DEFAULTS = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "use_flash_attn": False,
}
"""The fields of :class:`MplugOwlVisionConfig` and their defaults."""

ABSTRACTOR_DEFAULTS = {
    "num_learnable_queries": 64,
    "hidden_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "intermediate_size": 2816,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-6,
    "encoder_hidden_size": 1024,
    "grid_size": 32,
}
"""The fields of :class:`MplugOwlVisualAbstractorConfig` and their defaults (a None or 0 ``grid_size`` is 32)."""

LLM_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pretraining_tp": 1,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
}
"""The LLaMA-2 fields of :class:`MPLUGOwl2Config` that are stored as given, and their defaults."""


def _take_fields(config: PretrainedConfig, defaults: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Set each field of ``defaults`` on ``config``: its keyword argument (popped from ``kwargs``), else the default."""
    for name, default in defaults.items():
        setattr(config, name, kwargs.pop(name, default))


class MplugOwlVisionConfig(PretrainedConfig):
    """ViT-L/14 vision encoder at 448 px (1024 patches + CLS); fields and defaults: :data:`VISION_DEFAULTS`.

    ``hidden_act`` is stored for compatibility only: the encoder always uses QuickGELU, like the original.
    """

    model_type = "mplug_owl_vision_model"

    def __init__(self, **kwargs: Any):
        _take_fields(self, VISION_DEFAULTS, kwargs)
        super().__init__(**kwargs)


class MplugOwlVisualAbstractorConfig(PretrainedConfig):
    """The 6-layer cross-attention abstractor that turns 1025 image tokens into 64 queries; fields and defaults:
    :data:`ABSTRACTOR_DEFAULTS`."""

    model_type = "mplug_owl_visual_abstract"

    def __init__(self, **kwargs: Any):
        _take_fields(self, ABSTRACTOR_DEFAULTS, kwargs)
        self.grid_size = self.grid_size or ABSTRACTOR_DEFAULTS["grid_size"]
        super().__init__(**kwargs)


class MPLUGOwl2Config(PretrainedConfig):
    """LLaMA-2 with modality-adaptive layers, the visual path in ``visual_config``, and the Q-Scorer head fields.

    ``visual_config`` is a plain dict with the sub-dicts ``visual_model`` and ``visual_abstractor``, as the original
    writes it; ``vision_config`` / ``abstractor_config`` rebuild the typed sub-configs from it.

    Q-Scorer fields: ``score_token_id`` (the score token ids, ``<score5>`` first), ``score_tokens`` (the token
    strings, ``<score1>`` first) and ``deepmlp_hidden_dims`` (hidden widths of the regression head).

    Training fields, written by ``qscorer train`` (the original's names; None = not recorded, and only recorded
    fields reach config.json, as in the original): the objective's settings of :data:`OBJECTIVE_DEFAULTS`
    (:meth:`objective` resolves them); ``image_aspect_ratio`` ("pad": images padded to a square before the CLIP
    preprocessing, "square": fed as they are) and ``image_grid_pinpoints`` (unused, always None) of the training
    data; ``tune_visual_abstractor`` / ``freeze_vision_model`` (which visual parts were trained) and
    ``visual_abstractor_lr`` (the abstractor's learning rate, None = the global one).
    """

    model_type = "mplug_owl2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        num_key_value_heads: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        rope_scaling: dict | None = None,
        visual_config: dict | None = None,
        score_token_id: list[int] | None = None,
        score_tokens: list[str] | None = None,
        deepmlp_hidden_dims: list[int] | None = None,
        **kwargs: Any,
    ):
        _take_fields(self, LLM_DEFAULTS, kwargs)
        self.num_key_value_heads = self.num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
            raise ValueError(f"rope_scaling={rope_scaling!r} is not supported: mPLUG-Owl2 uses plain RoPE")
        if visual_config is None:
            visual_config = {
                "visual_model": MplugOwlVisionConfig().to_dict(),
                "visual_abstractor": MplugOwlVisualAbstractorConfig().to_dict(),
            }
        self.visual_config = visual_config
        self.score_token_id = list(score_token_id or [])
        self.score_tokens = list(score_tokens or [])
        self.deepmlp_hidden_dims = list(
            DEFAULT_DEEPMLP_HIDDEN_DIMS if deepmlp_hidden_dims is None else deepmlp_hidden_dims
        )
        _take_fields(self, dict.fromkeys(TRAINING_FIELDS), kwargs)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict; ``rope_scaling`` is written as null, the form the original (LlamaConfig) reads."""
        output = super().to_dict()
        output.pop("rope_parameters", None)
        output["rope_scaling"] = None
        return output

    def objective(self, name: str):
        """The objective setting ``name`` (a key of :data:`OBJECTIVE_DEFAULTS`): recorded, else its default."""
        value = getattr(self, name)
        return OBJECTIVE_DEFAULTS[name] if value is None else value

    @property
    def vision_config(self) -> MplugOwlVisionConfig:
        """The vision encoder's config, rebuilt from ``visual_config["visual_model"]``."""
        return MplugOwlVisionConfig(**self.visual_config.get("visual_model", {}))

    @property
    def abstractor_config(self) -> MplugOwlVisualAbstractorConfig:
        """The abstractor's config, rebuilt from ``visual_config["visual_abstractor"]``."""
        return MplugOwlVisualAbstractorConfig(**self.visual_config.get("visual_abstractor", {}))
