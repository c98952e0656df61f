"""Build the model to train: base weights, score tokens, LoRA, trainable set, training config.

Order, as in the original ``train_mem.train``: load the base model in the compute dtype; add the five score tokens
(embeddings grown, new ``lm_head`` rows = mean of the old ones); ``use_cache`` off; input embeddings made to
require grad for gradient checkpointing; LoRA on the query projections and the image-branch value projections of
the LLM; then the trainable set (LoRA, ``lm_head``, ``deepmlp``, the abstractor with ``--tune_visual_abstractor``,
the vision encoder unless ``--freeze_vision_model``) and the training fields written into the config.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import TOKENIZER_FILES, unwrap_peft
from ..constants import SCORE_TOKENS
from ..errors import QScorerError
from ..model.configuration import OBJECTIVE_DEFAULTS

logger = logging.getLogger(__name__)

LORA_TARGET_PATTERNS = ("q_proj", "v_proj.multiway.1")
"""Module-name substrings the original adapts (its ``find_all_linear_names``): the shared query projection and the
image branch of the value projection, in the LLM only."""

PAIR_CONFIG_FIELDS = (
    "weight_in_level",
    "continuous_rating_loss",
    "binary_rating_loss",
    "closeset_rating_loss",
    "use_fix_std",
    "detach_pred_std",
    "weight_rank",
    "rank_score_source",
)
"""Training fields the original writes into config.json for pair training only (``weight_rank`` and
``rank_score_source`` are qscorer's)."""


def compute_dtype(training_args) -> torch.dtype:
    """float16 with ``--fp16``, bfloat16 with ``--bf16``, else float32, like the original."""
    if training_args.fp16:
        return torch.float16
    if training_args.bf16:
        return torch.bfloat16
    return torch.float32


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of the linear layers LoRA adapts, chosen like the original: every name containing ``q_proj`` or
    ``v_proj.multiway.1`` outside the visual abstractor (the vision encoder has none), in module order.

    For the 7B model: ``model.layers.{i}.self_attn.q_proj`` and ``model.layers.{i}.self_attn.v_proj.multiway.1``,
    i = 0..31 (64 names).
    """
    names = []
    for name, module in model.named_modules():
        if "visual_abstractor" in name or "lm_head" in name or not isinstance(module, nn.Linear):
            continue
        if any(pattern in name for pattern in LORA_TARGET_PATTERNS):
            names.append(name)
    return names


def load_training_tokenizer(model_args, training_args):
    """The base model's tokenizer with the score tokens, ``model_max_length`` from the flags, pad = unk."""
    from ..data.tokenization import load_tokenizer

    return load_tokenizer(model_args.model_name_or_path, model_max_length=training_args.model_max_length)


def build_model(model_args, data_args, training_args, tokenizer):
    """The model ready for the Trainer: the base model of ``--model_name_or_path`` in the compute dtype with the
    score tokens, prepared by :func:`prepare_for_training`."""
    from ..data.tokenization import score_token_ids
    from ..loading import resolve_attn_implementation
    from ..model import MPLUGOwl2LlamaForCausalLM

    dtype = compute_dtype(training_args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = resolve_attn_implementation(model_args.attn_implementation, device)
    model = MPLUGOwl2LlamaForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=attention, cache_dir=training_args.cache_dir
    )
    model.add_score_tokens(score_token_ids(tokenizer), SCORE_TOKENS)
    if len(tokenizer) != model.config.vocab_size:
        raise QScorerError(
            f"the tokenizer of {model_args.model_name_or_path} has {len(tokenizer)} tokens with the score tokens but "
            f"the model's vocabulary has {model.config.vocab_size} rows"
        )
    return prepare_for_training(model, model_args, data_args, training_args)


def prepare_for_training(model, model_args, data_args, training_args):
    """Cache off, input grads for gradient checkpointing, LoRA (``--lora_enable``: a ``PeftModel`` is returned), the
    trainable set, the training fields in the config, and float32 trainable weights without DeepSpeed."""
    model.config.use_cache = False
    if model_args.freeze_backbone:
        model.model.requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    if training_args.lora_enable:
        model = add_lora(model, training_args)
    set_trainable(model, training_args)
    record_training_config(unwrap_peft(model).config, data_args, training_args)
    dtype = compute_dtype(training_args)
    if dtype != torch.float32 and not training_args.deepspeed:
        # Without DeepSpeed (which keeps fp32 master weights) the optimizer would update bf16/fp16 weights directly
        # and lose small steps: trainable parameters stay float32, frozen ones use the compute dtype (autocast).
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info("model prepared: %d of %d parameters trainable (%s)", trainable, total, dtype)
    return model


def add_lora(model, training_args):
    """Wrap the model with LoRA adapters on :func:`lora_target_modules`; with
    ``--lora_weight_path``, start from that checkpoint's adapter and non-LoRA weights.

    The wrapper is a plain ``PeftModel`` (no task type): peft's causal-LM wrapper needs generation hooks this model
    does not have, and the plain one passes the batch keys (``images``, ``input_type``, ...) through untouched. The
    saved adapter config still says ``task_type: CAUSAL_LM``, like the original's.
    """
    from peft import LoraConfig, get_peft_model

    from .saving import load_lora_checkpoint

    config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        target_modules=lora_target_modules(model),
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
    )
    model = get_peft_model(model, config)
    if training_args.lora_weight_path:
        load_lora_checkpoint(model, training_args.lora_weight_path)
        logger.info("LoRA training starts from %s", training_args.lora_weight_path)
    return model


def set_trainable(model, training_args) -> None:
    """Make the original's trainable set, setting ``requires_grad`` in the original's order.

    With LoRA only names containing ``lora_`` first; then every ``lm_head`` and ``deepmlp`` parameter; the whole
    abstractor follows ``--tune_visual_abstractor``, the whole vision encoder ``not --freeze_vision_model``.
    The three flags are recorded in the config.
    """
    if training_args.lora_enable:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    for name, parameter in model.named_parameters():
        if "lm_head" in name or "deepmlp" in name:
            parameter.requires_grad_(True)
    base = unwrap_peft(model)
    base.model.visual_abstractor.requires_grad_(training_args.tune_visual_abstractor)
    base.model.vision_model.requires_grad_(not training_args.freeze_vision_model)
    base.config.tune_visual_abstractor = training_args.tune_visual_abstractor
    base.config.freeze_vision_model = training_args.freeze_vision_model
    base.config.visual_abstractor_lr = training_args.visual_abstractor_lr


def record_training_config(config, data_args, training_args) -> None:
    """Write the training fields into the model config, as the original did: the task weights and the image
    settings always, the pair-loss settings for pair training; qscorer's soft-label KL and in-level weights and
    the rating tokens when set. The batch objective reads its settings from there."""
    if data_args.dataset_type == "pair":
        for name in PAIR_CONFIG_FIELDS:
            setattr(config, name, getattr(training_args, name))
    if training_args.weight_soft_kl:
        config.weight_soft_kl = training_args.weight_soft_kl
        config.soft_kl_closed_set = training_args.soft_kl_closed_set
    if training_args.weight_in_level is not None:
        config.weight_in_level = training_args.weight_in_level
    if training_args.rating_tokens != OBJECTIVE_DEFAULTS["rating_tokens"]:
        config.rating_tokens = training_args.rating_tokens
    config.weight_desp = training_args.weight_desp
    config.weight_next_token = training_args.weight_next_token
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.image_grid_pinpoints = data_args.image_grid_pinpoints


def write_base_model(output_dir, config, tokenizer_dir, *, seed: int = 0, head_start: float | None = None) -> Path:
    """Write a randomly initialised base model folder to train from scratch (tiny experiments, tests, benchmarks).

    The folder is that of :func:`save_base_model`. ``config.vocab_size`` must be the tokenizer's vocabulary without
    the score tokens. ``head_start`` sets the regression head's output bias (e.g. 3, mid-scale: from 0, half the
    first predictions fall below the training loss's [0, 5] clamp, where they get no gradient).
    """
    from ..model import MPLUGOwl2LlamaForCausalLM

    torch.manual_seed(seed)
    model = MPLUGOwl2LlamaForCausalLM(config)
    if head_start is not None:
        with torch.no_grad():
            model.deepmlp.output_layer.bias.fill_(head_start)
    return save_base_model(model, output_dir, tokenizer_dir)


def save_base_model(model, output_dir, tokenizer_dir) -> Path:
    """Write ``model`` as a base model folder like ``mplug-owl2-llama2-7b``: ``config.json``, the safetensors
    weights, the tokenizer files of ``tokenizer_dir`` (its ``tokenizer.model`` and configs; the score tokens are
    added at training time) and the image-processor config."""
    from ..model.image_processing import ImageProcessor

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if not source.is_file():
            raise QScorerError(f"tokenizer folder {tokenizer_dir} has no {name}")
        shutil.copyfile(source, output_dir / name)
    ImageProcessor().save_pretrained(output_dir)
    return output_dir
