"""MPLUGOwl2LlamaForCausalLM: mPLUG-Owl2 with the Q-Scorer regression head.

Data path: images -> vision encoder -> abstractor (65 visual rows each) -> spliced into the text embeddings at the
-200 placeholders -> modality-adaptive LLaMA -> final-norm hidden states -> ``lm_head`` (token logits) and
``deepmlp`` (the quality score, read at the position that predicts the score token).

``qscorer merge`` ships this package's modules, unchanged, as the remote code of a merged folder. transformers 4.x
copies from a local folder only the modules that the modeling file imports itself, so this file imports every module
the model runs on, also those it only uses through the others (the imports marked F401).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .abstractor import MplugOwlVisualAbstractorModel, MplugOwlVisualAbstractorMultiHeadAttention
from .attention import run_layer
from .configuration import SCORE_RANGE, MPLUGOwl2Config
from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .errors import QScorerError  # noqa: F401
from .flash import flash_attention  # noqa: F401
from .head import DeepMLP
from .image_processing import ImageProcessor  # noqa: F401
from .llama import (
    KeyValue,
    MPLUGOwl2DecoderLayer,
    MPLUGOwl2RMSNorm,
    additive_attention_mask,
    position_ids_for,
    rotary_cos_sin,
)
from .processing import ScoreProcessor
from .resample import resize_window  # noqa: F401
from .vision import MplugOwlVisionEmbeddings, MplugOwlVisionModel

logger = logging.getLogger(__name__)

TASK_WEIGHTS = {"description": "weight_desp", "score": "weight_next_token"}
"""The training records' task types, and the config setting that weights each one's loss."""
TASK_INPUTS = ("input_ids", "attention_mask", "labels", "images", "gt_scores")
"""The batch keys that are split by row between the task types."""


@dataclass
class QScorerCausalLMOutput(ModelOutput):
    """Output of ``forward``.

    - ``loss``: cross-entropy + (sum of squared score errors) / batch size, when ``labels`` are given;
      ``loss_ce`` / ``loss_score`` hold the two terms.
    - ``cache``: the KV cache, one (key, value) pair per layer (transformers 5 names this field ``cache``; the
      same name is used on 4.x).
    - ``last_hidden_state``: final-norm hidden states over the spliced sequence (text + 65 rows per image);
      ``hidden_states``: the per-layer tuple when requested.
    - ``attention_mask``: the spliced padding mask (None when no row is padded).
    - ``score_positions`` [N, 2]: (row, position) pairs whose next label is a score token;
      ``score_predictions`` [N]: the clamped head outputs there.
    - ``labels``: the labels over the spliced sequence (-100 on the image rows), aligned with ``logits``, when
      ``labels`` are given (training objectives find other answer tokens in them).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: tuple[KeyValue, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    loss_ce: torch.Tensor | None = None
    loss_score: torch.Tensor | None = None
    score_positions: torch.Tensor | None = None
    score_predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class QScorerTaskOutput(ModelOutput):
    """Output of the task-type dispatcher (``input_type="single"``): the weighted loss, its unweighted parts, and
    the forward output of the score records (``score_rows``: their rows in the batch), whose logits and score
    positions the trainer's extra terms read."""

    loss: torch.Tensor | None = None
    loss_description: torch.Tensor | None = None
    loss_score: torch.Tensor | None = None
    score_rows: list[int] | None = None
    score_output: QScorerCausalLMOutput | None = None


@dataclass
class ScorePrediction(ModelOutput):
    """Per-image scoring result of ``predict_scores``.

    ``scores`` [B]: the head's output (not clamped). ``score_token_logits`` / ``score_token_probs`` [B, 5]: logits
    of ``<score5>``..``<score1>`` at the appended token and their probabilities under the softmax over the whole
    vocabulary. ``token_ids`` [B]: the argmax token appended after the prompt. ``hidden`` [B, width]: the head's input.
    """

    scores: torch.Tensor | None = None
    score_token_logits: torch.Tensor | None = None
    score_token_probs: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class MultimodalInputs:
    """Text embeddings with the visual rows spliced in, and what goes with them."""

    inputs_embeds: torch.Tensor
    modality_indicators: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None


def _guarded(tensor: torch.Tensor) -> bool:
    """True when transformers marked the tensor as loaded from a checkpoint (it must not be re-initialised)."""
    return getattr(tensor, "_is_hf_initialized", False)


class MPLUGOwl2PreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading rules shared by the mPLUG-Owl2 models."""

    config_class = MPLUGOwl2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MPLUGOwl2DecoderLayer", "MplugOwlVisionEncoderLayer", "MplugOwlVisualAbstractorLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _keys_to_ignore_on_load_missing = [r"\.[qk]_pos_embed$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) for linear / conv / embedding weights and learned tokens, zero biases, unit norms,
        fixed sin-cos tables for the abstractor; tensors loaded from a checkpoint are left alone.

        The regression head gets N(0, 0.02) weights too: the original declares a Kaiming init, but under
        transformers 4.36's ``from_pretrained`` that call is a no-op and this is what it effectively trains from.
        """
        std = self.config.initializer_range
        normal = [module.weight] if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) else []
        zeros = [module.bias] if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)) else []
        ones = [module.weight] if isinstance(module, (nn.LayerNorm, MPLUGOwl2RMSNorm)) else []
        if isinstance(module, MplugOwlVisionEmbeddings):
            normal += [module.cls_token, module.position_embedding]
        if isinstance(module, MplugOwlVisualAbstractorModel):
            normal += [module.query_embeds, module.vit_eos]
        if isinstance(module, MplugOwlVisualAbstractorMultiHeadAttention):
            module.reset_position_tables()
        for tensor in normal:
            if not _guarded(tensor):
                tensor.normal_(0.0, std)
        for tensor in zeros:
            if tensor is not None and not _guarded(tensor):
                tensor.zero_()
        for tensor in ones:
            if not _guarded(tensor):
                tensor.fill_(1.0)


class MPLUGOwl2LlamaModel(nn.Module):
    """The language model (``embed_tokens``, ``layers``, ``norm``) plus the visual path (``vision_model``,
    ``visual_abstractor``), registered in the original's order so state-dict keys and order match."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(MPLUGOwl2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = MPLUGOwl2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision_model = MplugOwlVisionModel(config.vision_config, config)
        self.visual_abstractor = MplugOwlVisualAbstractorModel(config.abstractor_config, config.hidden_size, config)
        self.gradient_checkpointing = False

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, 65, width]: vision encoder, abstractor, visual_fc, vit_eos."""
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embed.weight.dtype)
        return self.visual_abstractor(self.vision_model(pixel_values))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        modality_indicators: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Sequence[KeyValue] | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[KeyValue, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Run the decoder on embeddings [B, L, width]; returns (final-norm hidden, cache, per-layer hiddens).

        ``attention_mask`` [B, past + L] marks real tokens (None = no padding).
        """
        batch, length, _ = inputs_embeds.shape
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is not None and attention_mask.shape[-1] != past_length + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {past_length + length} "
                f"({past_length} cached + {length} new)"
            )
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        position_ids = position_ids_for(attention_mask, batch, length, past_length, device)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rotary = rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, dtype)
        additive_mask = None
        if not self.config._attn_implementation.startswith("flash_attention"):
            additive_mask = additive_attention_mask(attention_mask, length, past_length, dtype, device)

        hidden = inputs_embeds
        presents, all_hidden = [], []
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            past = past_key_values[index] if past_key_values else None
            arguments = (hidden, modality_indicators, rotary, attention_mask, additive_mask, past)
            hidden, present = run_layer(self, layer, *arguments)
            if use_cache:
                presents.append(present)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return hidden, (tuple(presents) if use_cache else None), (tuple(all_hidden) if output_hidden_states else None)


def _flatten_images(images) -> torch.Tensor:
    """Images as one [N, 3, S, S] tensor, in order: a 4-D tensor, a 5-D [B, n, 3, S, S] tensor, or a list of
    [3, S, S] / [n, 3, S, S] tensors (samples with several images)."""
    if isinstance(images, torch.Tensor):
        return images.flatten(0, images.dim() - 4)
    return torch.cat([image.reshape(-1, *image.shape[-3:]) for image in images], dim=0)


def task_subsets(task_types: Sequence[str], batch: dict) -> list[tuple[str, list[int], dict]]:
    """``(task, rows, sub-batch)`` for each task type present in ``task_types`` (one per row), in
    :data:`TASK_WEIGHTS` order; the sub-batch holds the :data:`TASK_INPUTS` of those rows."""
    unknown = sorted(set(task_types) - set(TASK_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown task_types {unknown}: expected one of {list(TASK_WEIGHTS)}")
    subsets = []
    for task in TASK_WEIGHTS:
        rows = [row for row, task_type in enumerate(task_types) if task_type == task]
        if rows:
            subsets.append(
                (task, rows, {key: _select_rows(batch[key], rows) for key in TASK_INPUTS if batch.get(key) is not None})
            )
    return subsets


def _select_rows(value, rows: list[int]):
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(rows, device=value.device)]
    return [value[row] for row in rows]


def splice_image_features(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> MultimodalInputs:
    """Place each image's visual rows (``features`` [N, 65, width], in batch order) where its -200 placeholder is in
    ``input_ids`` [B, L], and the text embeddings [B, L, width] around them; labels, mask and modality indicators
    follow. One scatter per tensor, no loop over rows. See ``prepare_multimodal_inputs`` for the conventions.
    """
    is_placeholder = input_ids == IMAGE_TOKEN_INDEX
    batch, length = input_ids.shape
    visual_rows = features.shape[1]
    placeholders = is_placeholder.sum(dim=1)
    total = int(placeholders.sum())
    consumed = placeholders
    if features.shape[0] != total:
        if features.shape[0] != total + int((placeholders == 0).sum()):
            raise ValueError(f"{features.shape[0]} images for {total} image placeholders in the batch")
        consumed = placeholders.clamp(min=1)  # text-only rows take an image they do not use

    earlier = is_placeholder.long().cumsum(dim=1) - is_placeholder.long()  # placeholders before each position
    position = torch.arange(length, device=input_ids.device) + earlier * (visual_rows - 1)
    lengths = length + placeholders * (visual_rows - 1)
    longest = int(lengths.max())
    device = input_ids.device

    text_rows, text_columns = (~is_placeholder).nonzero(as_tuple=True)
    text_index = (text_rows, position[text_rows, text_columns])
    image_rows, image_columns = is_placeholder.nonzero(as_tuple=True)
    first_image_of_row = consumed.cumsum(dim=0) - consumed
    image_numbers = first_image_of_row[image_rows] + earlier[image_rows, image_columns]
    offsets = torch.arange(visual_rows, device=device)
    visual_index = (
        image_rows[:, None].expand(-1, visual_rows),
        position[image_rows, image_columns][:, None] + offsets,
    )

    def placed(text_values: torch.Tensor, visual_value, fill, dtype) -> torch.Tensor:
        shape = (batch, longest, *text_values.shape[2:])
        result = torch.full(shape, fill, dtype=dtype, device=device).index_put(
            text_index, text_values[text_rows, text_columns].to(dtype)
        )
        return result.index_put(visual_index, visual_value)

    inputs_embeds = placed(text_embeds, features[image_numbers], 0.0, text_embeds.dtype)
    indicators = placed(torch.zeros_like(input_ids), torch.ones((), dtype=torch.long, device=device), 0, torch.long)
    new_labels = None
    if labels is not None:
        no_label = torch.tensor(IGNORE_INDEX, dtype=labels.dtype, device=device)
        new_labels = placed(labels.to(device), no_label, IGNORE_INDEX, labels.dtype)
    if attention_mask is not None:
        mask = placed(attention_mask.to(device), torch.ones((), dtype=torch.bool, device=device), False, torch.bool)
    elif bool((lengths != longest).any()):
        mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
    else:
        mask = None
    return MultimodalInputs(inputs_embeds, indicators, mask, new_labels)


class MPLUGOwl2LlamaForCausalLM(MPLUGOwl2PreTrainedModel):
    """mPLUG-Owl2 causal LM with Q-Scorer's ``deepmlp`` regression head.

    ``forward(**batch)`` is the causal-LM forward with the score loss (``forward_mlp``);
    ``forward(input_type="single", task_types=[...], **batch)`` is the training dispatcher over task types.
    ``predict_scores`` scores images with one prefill and one cached step.
    """

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__(config)
        self.model = MPLUGOwl2LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.deepmlp = DeepMLP(config.hidden_size, config.deepmlp_hidden_dims)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def add_score_tokens(self, score_token_ids: Sequence[int], score_tokens: Sequence[str]) -> None:
        """Grow the embeddings to cover the score tokens and record them in the config.

        ``score_tokens`` are ``<score1>``..``<score5>`` and ``score_token_ids`` their ids in the same order. New
        ``lm_head`` rows are the mean of the existing rows, as in the original. New input-embedding rows are the mean of
        the existing rows too (the original left them random N(0, 0.02); they are never trained in LoRA mode and
        every released checkpoint carries its own values, so this choice only affects training from a base model).
        ``config.score_token_id`` lists the ids in reverse (``<score5>`` first), like the original.
        """
        ids = [int(token_id) for token_id in score_token_ids]
        if len(ids) != len(score_tokens):
            raise ValueError(f"{len(ids)} score token ids for {len(score_tokens)} score tokens")
        old_size = self.model.embed_tokens.num_embeddings
        new_size = max(old_size, max(ids) + 1)
        if new_size > old_size:
            self.model.embed_tokens = self._grown_embedding(self.model.embed_tokens, new_size)
            self.lm_head = self._grown_lm_head(self.lm_head, new_size)
            self.config.vocab_size = new_size
        self.config.score_token_id = list(reversed(ids))
        self.config.score_tokens = list(score_tokens)

    @staticmethod
    def _grown_embedding(old: nn.Embedding, new_size: int) -> nn.Embedding:
        weight = old.weight
        new = nn.Embedding(
            new_size, weight.shape[1], padding_idx=old.padding_idx, device=weight.device, dtype=weight.dtype
        )
        new.weight[: weight.shape[0]] = weight
        new.weight[weight.shape[0] :] = weight.mean(dim=0, keepdim=True)
        new.weight.requires_grad_(weight.requires_grad)
        return new

    @staticmethod
    def _grown_lm_head(old: nn.Linear, new_size: int) -> nn.Linear:
        weight = old.weight
        new = nn.Linear(weight.shape[1], new_size, bias=False, device=weight.device, dtype=weight.dtype)
        new.weight[: weight.shape[0]] = weight
        new.weight[weight.shape[0] :] = weight.mean(dim=0, keepdim=True)
        new.weight.requires_grad_(weight.requires_grad)
        return new

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images,
    ) -> MultimodalInputs:
        """Embed the text and splice each image's 65 visual rows in place of its -200 placeholder.

        Images are consumed in order, one per placeholder, across the whole batch. When the batch carries one
        image per text-only sample as well (the original's training convention), each text-only sample consumes
        its image without using it. Visual rows get modality indicator 1, label -100 and mask 1; rows of
        different lengths are right-padded (zeros, indicator 0, label -100, mask 0).
        """
        is_placeholder = input_ids == IMAGE_TOKEN_INDEX
        text_embeds = self.model.embed_tokens(input_ids.masked_fill(is_placeholder, 0))
        if images is None:
            if is_placeholder.any():
                raise ValueError("input_ids contain image placeholders (-200) but no images were given")
            indicators = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
            return MultimodalInputs(text_embeds, indicators, attention_mask, labels)

        features = self.model.encode_images(_flatten_images(images)).to(text_embeds.device, text_embeds.dtype)
        return splice_image_features(input_ids, text_embeds, features, labels, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Sequence[KeyValue] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        images=None,
        gt_scores: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        input_type: str | None = None,
        task_types: Sequence[str] | None = None,
    ):
        """Causal-LM forward over text with spliced images; with ``labels``, loss = CE + score loss.
        ``input_type="single"``: the task-type dispatcher over ``task_types`` (:meth:`forward_task_types`), which
        takes the :data:`TASK_INPUTS` only.

        ``logits_to_keep`` > 0 computes logits for the last positions only (not with ``labels``). With
        ``past_key_values``, ``attention_mask`` (if any) covers the cached and the new tokens.
        ``return_dict=False`` returns ``to_tuple()`` of the same output (the loss keeps its score term, unlike the
        original's tuple path).
        """
        if input_type == "single":
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, images=images)
            return self.forward_task_types(task_types, **inputs, gt_scores=gt_scores)
        if input_type is not None:
            raise ValueError(f"unknown input_type {input_type!r}: expected None or 'single'")
        if output_attentions:
            raise ValueError("output_attentions is not supported")
        if use_cache is None:
            use_cache = self.config.use_cache and not (self.training and self.model.gradient_checkpointing)
        if past_key_values and images is not None:
            raise ValueError("images belong to the prefill; a cached step takes text tokens only")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with images) or inputs_embeds")
            spliced = self.prepare_multimodal_inputs(input_ids, attention_mask, labels, images)
        else:
            if images is not None:
                raise ValueError("images can only be spliced into input_ids, not into inputs_embeds")
            indicators = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            spliced = MultimodalInputs(inputs_embeds, indicators, attention_mask, labels)
        hidden, cache, all_hidden = self.model(
            spliced.inputs_embeds,
            spliced.modality_indicators,
            spliced.attention_mask,
            past_key_values,
            use_cache,
            bool(output_hidden_states),
        )
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep cannot be combined with labels")
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        losses = {} if spliced.labels is None else self._losses(logits, hidden, spliced.labels, gt_scores)
        output = QScorerCausalLMOutput(
            logits=logits,
            cache=cache,
            hidden_states=all_hidden,
            last_hidden_state=hidden,
            attention_mask=spliced.attention_mask,
            labels=spliced.labels,
            **losses,
        )
        return output if return_dict is not False else output.to_tuple()

    def forward_task_types(self, task_types: Sequence[str] | None, **batch) -> QScorerTaskOutput:
        """Training dispatcher: loss = weight_desp * loss("description" rows) + weight_next_token * loss("score" rows),
        the weights from the config (:meth:`MPLUGOwl2Config.objective`).

        Each part is the full ``forward_mlp`` loss of its rows. A task type absent from this process's batch simply
        contributes nothing here. (The original all-gathered the counts and dropped a task type on EVERY rank when
        any rank had none of it, and padded smaller subsets by repeating samples; it also required CUDA and a
        process group. Gradient averaging across ranks needs neither.)
        """
        if task_types is None:
            raise ValueError("input_type='single' needs task_types (one per row)")
        total, losses, score_rows, score_output = None, {}, None, None
        for task, rows, subset in task_subsets(task_types, batch):
            output = self.forward_mlp(**subset)
            losses[task] = output.loss
            weighted = self.config.objective(TASK_WEIGHTS[task]) * output.loss
            total = weighted if total is None else total + weighted
            if task == "score":
                score_rows, score_output = rows, output
        return QScorerTaskOutput(
            loss=total,
            loss_description=losses.get("description"),
            loss_score=losses.get("score"),
            score_rows=score_rows,
            score_output=score_output,
        )

    def forward_mlp(self, *args, **kwargs):
        """:meth:`forward` without ``input_type`` (the original's name), called as the class's function so that
        wrappers installed on ``forward`` run once, around the whole step."""
        return MPLUGOwl2LlamaForCausalLM.forward(self, *args, **kwargs)

    def _losses(
        self, logits: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor, gt_scores: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy on next tokens plus the score term: the head reads the hidden state at every position whose
        NEXT label is a score token; sum of squared errors of the clamped predictions, divided by the batch size.

        The cross-entropy runs in float32 (the original used the logits' dtype, bf16 in training). A batch without
        supervised tokens gives CE 0 instead of NaN.
        """
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:].to(shift_logits.device)
        if bool((shift_labels != IGNORE_INDEX).any()):
            loss_ce = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        else:
            loss_ce = shift_logits.sum() * 0.0

        score_ids = torch.tensor(self.config.score_token_id, dtype=shift_labels.dtype, device=shift_labels.device)
        is_score_next = torch.isin(shift_labels, score_ids)
        positions = is_score_next.nonzero()
        predictions = self.deepmlp(hidden[:, :-1][is_score_next]).clamp(*SCORE_RANGE)
        if positions.shape[0]:
            if gt_scores is None:
                raise ValueError("labels contain score tokens but gt_scores is missing")
            targets = gt_scores.to(predictions.device)[positions[:, 0]]
            loss_score = (predictions - targets).pow(2).sum() / labels.shape[0]
        else:
            if not self.config.score_token_id:
                logger.warning("config.score_token_id is empty: the score head gets no training signal")
            loss_score = predictions.sum() * 0.0
        return {
            "loss": loss_ce + loss_score,
            "loss_ce": loss_ce,
            "loss_score": loss_score,
            "score_positions": positions,
            "score_predictions": predictions,
        }

    def predict_scores(self, input_ids: torch.Tensor, images) -> ScorePrediction:
        """Score images with one prefill and one KV-cached step (the original: two full forward passes, same numbers).

        ``input_ids`` [B, L]: the scoring prompt (same length for every row, ending in "▁is"), one -200 each.
        The argmax token after the prompt is appended; the hidden state at that token feeds the head, and the
        logits there give the score-token distribution. Keeps the autograd graph (no ``no_grad`` inside).
        """
        if not self.config.score_token_id:
            raise ValueError("the model has no score tokens (config.score_token_id is empty)")
        prefill = self.forward_mlp(input_ids=input_ids, images=images, use_cache=True, logits_to_keep=1)
        token_ids = prefill.logits[:, -1].argmax(dim=-1)
        step = self.forward_mlp(input_ids=token_ids[:, None], past_key_values=prefill.cache, use_cache=False)
        hidden = step.last_hidden_state[:, -1]
        logits = step.logits[:, -1].float()
        score_ids = torch.tensor(self.config.score_token_id, device=logits.device)
        return ScorePrediction(
            scores=self.deepmlp(hidden),
            score_token_logits=logits[:, score_ids],
            score_token_probs=logits.softmax(dim=-1)[:, score_ids],
            token_ids=token_ids,
            hidden=hidden,
        )

    @torch.inference_mode()
    def score(self, images, processor: ScoreProcessor | None = None, prompt: str = "eval", clamp: bool = True):
        """Quality scores of PIL images (one image or a list), as a list of floats: the original ``model.score()``.

        ``processor`` turns the images into prompt ids and pixel values; by default it is read from the model folder
        (``score_prompts.json``, written by ``qscorer merge``). The original took a tokenizer and an image processor
        instead. ``prompt="eval"`` is the original's batch-evaluation prompt (the published numbers);
        ``prompt="scorer"`` is the one the original ``score()`` used; ``prompt="training"`` is the training template
        up to the answer. Scores are clamped to [0, 5] unless ``clamp=False``.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if processor is None:
            processor = ScoreProcessor.from_pretrained(self.name_or_path)
        input_ids, pixels = processor(images, prompt)
        scores = self.predict_scores(input_ids.to(self.device), pixels.to(self.device)).scores.float()
        return (scores.clamp(*SCORE_RANGE) if clamp else scores).tolist()
