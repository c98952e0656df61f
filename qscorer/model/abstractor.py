"""Visual abstractor of mPLUG-Owl2.

64 learned queries cross-attend, in 6 layers, to the concatenation of themselves and the 1025 image tokens; fixed
sin-cos positions are added to queries and keys (not values); the residual base of each layer is the NORMALISED
queries. A linear map to the LLM width and the learned ``vit_eos`` row give 65 visual tokens per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from .attention import attend, run_layer
from .configuration import MplugOwlVisualAbstractorConfig

_LAYER_NORM_DEFAULT_EPS = 1e-5
"""norm1 / normk / norm2 use PyTorch's default eps in the original, not ``layer_norm_eps``."""


def _sincos_1d_numpy(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.astype(np.float32).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """[length, dim] table for positions 0..length-1: sines of pos * omega_d in the first half, cosines in the second.

    omega_d = 1 / 10000^(d / (dim/2)). Computed with numpy in float32, like the original, so that the tables are
    bit-identical to the buffers stored in its checkpoints (torch's float32 sin/pow differ in the last bits).
    """
    return torch.from_numpy(_sincos_1d_numpy(dim, np.arange(length)))


def sincos_2d_with_cls(dim: int, grid_size: int) -> torch.Tensor:
    """[1 + grid^2, dim] key positions: a zero row for CLS, then patch p = r*grid + c with the column's table in
    channels [0, dim/2) and the row's table in [dim/2, dim) (the MAE convention of the original)."""
    index = np.arange(grid_size, dtype=np.float32)
    columns, rows = np.meshgrid(index, index)
    patches = np.concatenate([_sincos_1d_numpy(dim // 2, columns), _sincos_1d_numpy(dim // 2, rows)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim), dtype=np.float32), patches], axis=0))


class MplugOwlVisualAbstractorMultiHeadAttention(nn.Module):
    """Cross-attention from the queries to [queries; image tokens] with fixed sin-cos positions.

    ``q_pos_embed`` [num_queries, width] and ``k_pos_embed`` [1 + grid^2, width] are persistent buffers, so that
    merged checkpoints (which contain them) load without unexpected keys; their values are recomputed on init.
    """

    def __init__(self, config: MplugOwlVisualAbstractorConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.attn_config = attn_config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.register_buffer("q_pos_embed", torch.empty(config.num_learnable_queries, config.hidden_size))
        self.register_buffer("k_pos_embed", torch.empty(1 + config.grid_size**2, config.hidden_size))
        self.reset_position_tables()

    @torch.no_grad()
    def reset_position_tables(self, names: Sequence[str] = ("q_pos_embed", "k_pos_embed")) -> None:
        """Fill the named tables among ``q_pos_embed`` / ``k_pos_embed`` with their fixed sin-cos values (a table
        loaded from a checkpoint is left alone)."""
        tables = {
            "q_pos_embed": lambda: sincos_1d(self.config.hidden_size, self.config.num_learnable_queries),
            "k_pos_embed": lambda: sincos_2d_with_cls(self.config.hidden_size, self.config.grid_size),
        }
        for name in names:
            buffer = getattr(self, name)
            if not getattr(buffer, "_is_hf_initialized", False):
                buffer.copy_(tables[name]())

    def _split_heads(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        return hidden.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, normed_queries: torch.Tensor, normed_image: torch.Tensor) -> torch.Tensor:
        dtype = normed_queries.dtype
        q_pos = self.q_pos_embed.to(dtype)
        key_value_input = torch.cat([normed_queries, normed_image], dim=1)
        key_pos = torch.cat([q_pos, self.k_pos_embed.to(dtype)], dim=0)
        if key_pos.shape[0] != key_value_input.shape[1]:
            raise ValueError(
                f"the abstractor's key positions cover {key_pos.shape[0] - q_pos.shape[0]} image tokens, "
                f"got {normed_image.shape[1]}"
            )
        query = self._split_heads(self.query(normed_queries + q_pos))
        key = self._split_heads(self.key(key_value_input + key_pos))
        value = self._split_heads(self.value(key_value_input))
        context = attend(
            query, key, value, None, implementation=self.attn_config._attn_implementation, softmax_in_fp32=False
        )
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)


class MplugOwlVisualAbstractorMLP(nn.Module):
    """w2(ffn_ln(silu(w1 x) * w3 x)); ffn_ln uses the config's eps (1e-6)."""

    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(hidden)) * self.w3(hidden)))


class MplugOwlVisualAbstractorCrossOutput(nn.Module):
    """out_proj + residual on the normalised queries, then a pre-norm MLP block."""

    def __init__(self, config: MplugOwlVisualAbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=_LAYER_NORM_DEFAULT_EPS)
        self.mlp = MplugOwlVisualAbstractorMLP(config)

    def forward(self, context: torch.Tensor, normed_queries: torch.Tensor) -> torch.Tensor:
        hidden = normed_queries + self.out_proj(context)
        return hidden + self.mlp(self.norm2(hidden))


class MplugOwlVisualAbstractorAttention(nn.Module):
    """One abstractor block: normalise queries (norm1) and image tokens (normk), attend, project, MLP."""

    def __init__(self, config: MplugOwlVisualAbstractorConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.attention = MplugOwlVisualAbstractorMultiHeadAttention(config, attn_config)
        self.output = MplugOwlVisualAbstractorCrossOutput(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=_LAYER_NORM_DEFAULT_EPS)
        self.normk = nn.LayerNorm(config.encoder_hidden_size, eps=_LAYER_NORM_DEFAULT_EPS)

    def forward(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        normed_queries = self.norm1(queries)
        context = self.attention(normed_queries, self.normk(image_features))
        return self.output(context, normed_queries)


class MplugOwlVisualAbstractorLayer(nn.Module):
    """Holds ``crossattention`` (the key prefix of the original checkpoints)."""

    def __init__(self, config: MplugOwlVisualAbstractorConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.crossattention = MplugOwlVisualAbstractorAttention(config, attn_config)

    def forward(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, image_features)


class MplugOwlVisualAbstractorEncoder(nn.Module):
    """The stack of abstractor layers; every layer reads the same image features."""

    def __init__(self, config: MplugOwlVisualAbstractorConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            MplugOwlVisualAbstractorLayer(config, attn_config) for _ in range(config.num_hidden_layers)
        )
        self.gradient_checkpointing = False

    def forward(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = run_layer(self, layer, queries, image_features)
        return queries


class MplugOwlVisualAbstractorModel(nn.Module):
    """image features [B, 1025, 1024] -> visual tokens [B, num_queries + 1, llm_width]."""

    def __init__(
        self, config: MplugOwlVisualAbstractorConfig, language_hidden_size: int, attn_config: PretrainedConfig
    ):
        super().__init__()
        self.config = config
        self.encoder = MplugOwlVisualAbstractorEncoder(config, attn_config)
        self.visual_fc = nn.Linear(config.hidden_size, language_hidden_size)
        self.query_embeds = nn.Parameter(torch.empty(1, config.num_learnable_queries, config.hidden_size))
        self.vit_eos = nn.Parameter(torch.empty(1, 1, language_hidden_size))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        batch = image_features.shape[0]
        queries = self.query_embeds.to(image_features.dtype).expand(batch, -1, -1)
        visual = self.visual_fc(self.encoder(queries, image_features))
        return torch.cat([visual, self.vit_eos.to(visual.dtype).expand(batch, -1, -1)], dim=1)
