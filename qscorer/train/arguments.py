"""The training flags: the original's three argument dataclasses, parsed with ``HfArgumentParser``.

Every flag of the original keeps its name and default. Flags added here (loss weights of the pair / soft-label
objectives, dataset field names, the attention kernel, the unreadable-image policy) are marked "(qscorer)" in their
help. The original's spellings that transformers has since renamed are accepted too (``--evaluation_strategy``).
:func:`validate_arguments` rejects combinations the original silently mishandled, with a message naming the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import transformers

from ..data.conversation import TRAINING_VERSIONS
from ..errors import QScorerError
from ..model.configuration import OBJECTIVE_DEFAULTS

logger = logging.getLogger(__name__)

_PARENT_FIELDS = {parent_field.name for parent_field in fields(transformers.TrainingArguments)}


def _help(text: str, **metadata) -> dict:
    return {"help": text, **metadata}


@dataclass
class ModelArguments:
    """Which base model to start from (original names and defaults)."""

    model_name_or_path: str | None = field(
        default="facebook/opt-125m",
        metadata=_help("base model folder (mplug-owl2-llama2-7b); no Hub downloads, so it must be a local folder"),
    )
    version: str | None = field(
        default="v0", metadata=_help("conversation template of the training prompts (train_lora.sh: v1)")
    )
    freeze_backbone: bool = field(default=False, metadata=_help("freeze the whole language model (model.model)"))
    attn_implementation: str = field(
        default="flash_attention_2",
        metadata=_help(
            "(qscorer) attention kernel of the LLM; the original always used flash_attention_2, which falls back to "
            "sdpa without CUDA and flash-attn",
            choices=["flash_attention_2", "sdpa", "eager"],
        ),
    )


@dataclass
class DataArguments:
    """Training metas and image handling (original names and defaults)."""

    dataset_type: str = field(
        default="single", metadata=_help("single: score / description records; pair: pairs for the ranking loss",
                                         choices=["single", "pair"])
    )
    data_paths: list[str] = field(default_factory=list, metadata=_help("training meta files (JSON list or lines)"))
    data_weights: list[int] = field(
        default_factory=list,
        metadata=_help("integer repeat count per meta file (default: 1 each; the original built an empty dataset)"),
    )
    lazy_preprocess: bool = field(default=False, metadata=_help("accepted for compatibility; items are always lazy"))
    is_multimodal: bool = field(default=False, metadata=_help("accepted for compatibility; always multimodal"))
    image_folder: str | None = field(default=None, metadata=_help("folder that image paths in the metas are under"))
    image_aspect_ratio: str = field(
        default="square", metadata=_help("pad: pad to a square first (train_lora.sh); square: resize and crop",
                                         choices=["pad", "square"])
    )
    image_grid_pinpoints: str | None = field(default=None, metadata=_help("recorded in config.json only"))
    on_unreadable: str = field(
        default="error",
        metadata=_help("(qscorer) an unreadable image stops training (error) or is replaced by the next readable "
                       "record (skip); the original used a random record", choices=["error", "skip"]),
    )
    pair_score_field: str = field(
        default="gt_score_norm", metadata=_help("(qscorer) record field with the [1, 5] score of pair items")
    )
    pair_std_field: str = field(
        default="std_norm", metadata=_help("(qscorer) record field with the [1, 5]-scale std of pair items")
    )
    level_probs_field: str = field(
        default="level_probs",
        metadata=_help("(qscorer) record field with the soft label (5 probabilities, excellent first) used by "
                       "--weight_soft_kl"),
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments plus the original's fields (same names and defaults) and qscorer's loss
    options. The original's spellings that transformers renamed are accepted: ``--evaluation_strategy`` (an alias of
    ``--eval_strategy``) and, on transformers 5, ``--warmup_ratio`` (a ratio passed as ``--warmup_steps``)."""

    cache_dir: str | None = field(default=None, metadata=_help("cache folder passed to from_pretrained"))
    optim: str = field(default="adamw_torch", metadata=_help("optimizer (transformers' names)"))
    remove_unused_columns: bool = field(default=False, metadata=_help("must stay False (custom batch keys)"))
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata=_help("(qscorer default False) DDP: every trainable parameter takes part in every step, so the "
                       "extra graph traversal is not needed"),
    )
    evaluation_strategy: str | None = field(
        default=None, metadata=_help("the original's spelling of --eval_strategy (no / steps / epoch)")
    )
    if "warmup_ratio" not in _PARENT_FIELDS:
        warmup_ratio: float | None = field(
            default=None, metadata=_help("the original's warmup ratio; transformers 5 takes it as --warmup_steps < 1")
        )
    weight_desp: float = field(
        default=OBJECTIVE_DEFAULTS["weight_desp"], metadata=_help("weight of the loss of description records")
    )
    weight_next_token: float = field(
        default=OBJECTIVE_DEFAULTS["weight_next_token"], metadata=_help("weight of the loss of score records")
    )
    weight_in_level: float | None = field(
        default=None, metadata=_help("weight of DeQA's in-level loss (mass outside the score tokens); None = off")
    )
    continuous_rating_loss: bool = field(
        default=OBJECTIVE_DEFAULTS["continuous_rating_loss"],
        metadata=_help("pair ranking loss: Thurstone fidelity against soft preferences (else binary)"),
    )
    binary_rating_loss: str = field(
        default=OBJECTIVE_DEFAULTS["binary_rating_loss"],
        metadata=_help("binary ranking loss kind", choices=["bce", "fidelity"]),
    )
    closeset_rating_loss: bool = field(
        default=OBJECTIVE_DEFAULTS["closeset_rating_loss"],
        metadata=_help("ranking scores from the softmax over the five score tokens only (else the full vocabulary)"),
    )
    use_fix_std: bool = field(
        default=OBJECTIVE_DEFAULTS["use_fix_std"],
        metadata=_help("ranking loss with unit stds instead of predicted ones"),
    )
    detach_pred_std: bool = field(
        default=OBJECTIVE_DEFAULTS["detach_pred_std"], metadata=_help("no gradient through the predicted stds")
    )
    tune_visual_abstractor: bool = field(default=False, metadata=_help("train the visual abstractor"))
    freeze_vision_model: bool = field(default=True, metadata=_help("keep the vision encoder frozen"))
    model_max_length: int = field(default=512, metadata=_help("longest sequence, image rows included"))
    double_quant: bool = field(default=True, metadata=_help("accepted for compatibility (QLoRA only)"))
    quant_type: str = field(default="nf4", metadata=_help("accepted for compatibility (QLoRA only)",
                                                          choices=["nf4", "fp4"]))
    bits: int = field(default=16, metadata=_help("weight bits; only 16 (4 / 8 = QLoRA is not implemented)"))
    lora_enable: bool = field(default=False, metadata=_help("train LoRA adapters instead of the full model"))
    lora_r: int = field(default=128, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=256, metadata=_help("LoRA alpha (scaling = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    lora_weight_path: str = field(
        default="", metadata=_help("a LoRA checkpoint folder to start from (adapter + non-LoRA weights)")
    )
    lora_bias: str = field(default="none", metadata=_help("LoRA bias mode", choices=["none", "all", "lora_only"]))
    visual_abstractor_lr: float | None = field(
        default=None, metadata=_help("learning rate of the abstractor (needs --tune_visual_abstractor True)")
    )
    group_by_modality_length: bool = field(
        default=False, metadata=_help("batches of similar length, image and text-only records apart")
    )
    save_safetensors: bool = field(
        default=False,
        metadata=_help("write adapter_model / non_lora_trainables as .safetensors (the original loader reads .bin)"),
    )
    weight_rank: float = field(
        default=OBJECTIVE_DEFAULTS["weight_rank"], metadata=_help("(qscorer) weight of the pair ranking loss")
    )
    weight_soft_kl: float = field(
        default=OBJECTIVE_DEFAULTS["weight_soft_kl"],
        metadata=_help("(qscorer) weight of the soft-label KL at the score position; 0 = off"),
    )
    soft_kl_closed_set: bool = field(
        default=OBJECTIVE_DEFAULTS["soft_kl_closed_set"],
        metadata=_help("(qscorer) soft-label KL over the five score tokens only (else DeQA's full-vocabulary form)"),
    )
    rank_score_source: str = field(
        default=OBJECTIVE_DEFAULTS["rank_score_source"],
        metadata=_help("(qscorer) the ranking loss compares the expected score of the score-token distribution "
                       "(tokens) or the regression head's output (head)", choices=["tokens", "head"]),
    )
    rating_tokens: str = field(
        default=OBJECTIVE_DEFAULTS["rating_tokens"],
        metadata=_help("(qscorer) the five answer tokens that --weight_soft_kl, --weight_in_level and the ranking "
                       "loss read: score_tokens (<score5>..<score1>) or level_words (excellent..bad, for answers "
                       "like '... is good.', as Q-Align / DeQA-Score train)", choices=["score_tokens", "level_words"]),
    )

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            if str(self.eval_strategy) not in ("no", self.evaluation_strategy):
                raise ValueError(
                    f"--evaluation_strategy {self.evaluation_strategy} and --eval_strategy {self.eval_strategy} "
                    "disagree; give one of them"
                )
            self.eval_strategy = self.evaluation_strategy
        if "warmup_ratio" not in _PARENT_FIELDS and self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps:
                raise ValueError(f"--warmup_ratio {self.warmup_ratio} must be in [0, 1) and not combined with "
                                 "--warmup_steps")
            self.warmup_steps = self.warmup_ratio
        # Non-reentrant checkpointing: a step may run the model more than once (task subsets, pair halves), which
        # reentrant checkpointing under DDP reports as parameters "marked ready twice". (transformers 5 renamed the
        # field activation_checkpointing_kwargs.)
        names = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
        checkpointing_kwargs = next(name for name in names if name in _PARENT_FIELDS)
        if getattr(self, checkpointing_kwargs) is None and self.gradient_checkpointing_kwargs is None:
            setattr(self, checkpointing_kwargs, {"use_reentrant": False})
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda_available():
            # Without use_cpu, transformers runs each process of a CPU launch as an independent single-process job.
            logger.info("distributed launch without CUDA: training on CPU (use_cpu=True, gloo)")
            self.use_cpu = True
        super().__post_init__()


def argument_parser() -> transformers.HfArgumentParser:
    """The HfArgumentParser of the three dataclasses."""
    return transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add every training flag to an argparse (sub-)parser, with HfArgumentParser's types and defaults."""
    group = parser.add_argument_group("training flags (the original's names; transformers TrainingArguments too)")
    for action in argument_parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            group._add_action(action)


def arguments_from_namespace(namespace: argparse.Namespace):
    """``(model_args, data_args, training_args)`` of a namespace parsed with :func:`add_flags`, validated."""
    return _validated(lambda parser: parser.parse_dict(vars(namespace), allow_extra_keys=True))


def parse_arguments(argv: Sequence[str]):
    """``(model_args, data_args, training_args)`` of a command line (the original's flags), validated.

    Unknown flags and bad values exit with argparse's usage message (status 2); invalid combinations raise
    :class:`QScorerError`.
    """
    return _validated(lambda parser: parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False))


def _validated(parse):
    """``parse(argument_parser())``, a ValueError as a :class:`QScorerError`, then :func:`validate_arguments`."""
    try:
        parsed = parse(argument_parser())
    except ValueError as error:
        raise QScorerError(f"invalid training flags: {error}") from None
    validate_arguments(*parsed)
    return parsed


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Reject flag combinations that cannot work, naming the flags (a :class:`QScorerError`)."""
    problems = []
    if not model_args.model_name_or_path or not Path(model_args.model_name_or_path).is_dir():
        problems.append(
            f"--model_name_or_path {model_args.model_name_or_path!r} is not a folder (no Hub downloads: pass the "
            "local base model folder, e.g. mplug-owl2-llama2-7b)"
        )
    if model_args.version not in TRAINING_VERSIONS:
        problems.append(
            f"--version {model_args.version!r} has no training template here; use one of {list(TRAINING_VERSIONS)} "
            "(train_lora.sh uses v1; the original's default v0 is not a Q-Scorer template)"
        )
    if not data_args.data_paths:
        problems.append("--data_paths is empty: give at least one training meta file")
    if data_args.data_weights and len(data_args.data_weights) != len(data_args.data_paths):
        problems.append(
            f"--data_paths has {len(data_args.data_paths)} files but --data_weights has "
            f"{len(data_args.data_weights)} values; give one weight per file (or none for 1 each)"
        )
    if any(weight < 0 for weight in data_args.data_weights) or (
        data_args.data_weights and not any(data_args.data_weights)
    ):
        problems.append(f"--data_weights {data_args.data_weights} must be integers >= 0, not all 0")
    problems += [f"--data_paths: {path} is not a file" for path in data_args.data_paths if not os.path.isfile(path)]
    if data_args.image_folder is not None and not Path(data_args.image_folder).is_dir():
        problems.append(f"--image_folder {data_args.image_folder} is not a folder")
    if training_args.bits != 16:
        problems.append(
            f"--bits {training_args.bits}: QLoRA (bitsandbytes 4 / 8-bit base weights) is not implemented in qscorer; "
            "use --bits 16 (train_lora.sh does)"
        )
    if training_args.fp16 and not _cuda_available():
        problems.append("--fp16 True needs a CUDA GPU; on CPU use --bf16 True --use_cpu True or full precision")
    if training_args.lora_enable and (training_args.lora_r < 1 or training_args.lora_alpha <= 0):
        problems.append(f"--lora_r {training_args.lora_r} / --lora_alpha {training_args.lora_alpha} must be positive")
    if not 0.0 <= training_args.lora_dropout < 1.0:
        problems.append(f"--lora_dropout {training_args.lora_dropout} must be in [0, 1)")
    if training_args.lora_weight_path:
        if not training_args.lora_enable:
            problems.append("--lora_weight_path needs --lora_enable True")
        elif not (Path(training_args.lora_weight_path) / "adapter_config.json").is_file():
            problems.append(f"--lora_weight_path {training_args.lora_weight_path} is not a LoRA checkpoint folder "
                            "(no adapter_config.json)")
    if training_args.visual_abstractor_lr is not None and not training_args.tune_visual_abstractor:
        problems.append("--visual_abstractor_lr is set but the abstractor is frozen: add --tune_visual_abstractor True")
    if training_args.visual_abstractor_lr is not None and training_args.visual_abstractor_lr <= 0:
        problems.append(f"--visual_abstractor_lr {training_args.visual_abstractor_lr} must be positive")
    weights = {
        "--weight_desp": training_args.weight_desp,
        "--weight_next_token": training_args.weight_next_token,
        "--weight_rank": training_args.weight_rank,
        "--weight_soft_kl": training_args.weight_soft_kl,
        "--weight_in_level": training_args.weight_in_level or 0.0,
    }
    problems += [f"{name} {value} must be >= 0" for name, value in weights.items() if value < 0]
    if training_args.rating_tokens == "level_words" and training_args.rank_score_source == "head":
        problems.append("--rank_score_source head reads the regression head at the score token: it needs "
                        "--rating_tokens score_tokens")
    if training_args.remove_unused_columns:
        problems.append("--remove_unused_columns True would drop the images and score targets: leave it False")
    if training_args.model_max_length < 128:
        problems.append(
            f"--model_max_length {training_args.model_max_length} is too short: an image alone takes 65 rows"
        )
    if problems:
        raise QScorerError("; ".join(problems))
    if data_args.dataset_type == "single" and training_args.weight_rank != 1.0:
        logger.warning("--weight_rank has no effect with --dataset_type single")
