"""ViT-L/14 vision encoder of mPLUG-Owl2.

Pre-LayerNorm on the embeddings, 24 pre-norm blocks with QuickGELU MLPs, and a post-LayerNorm over all tokens.
The fused ``query_key_value`` projection is grouped per head: channels ``h*3*d .. h*3*d+3*d`` hold head h's
query, key and value, in that order.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .attention import attend, run_layer
from .configuration import MplugOwlVisionConfig


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the CLIP activation (hard-wired in the original whatever ``hidden_act`` says)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * torch.sigmoid(1.702 * hidden)


class MplugOwlVisionEmbeddings(nn.Module):
    """Patch embedding (no bias) + CLS token + learned positions, then the pre-LayerNorm."""

    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Parameter(torch.empty(1, self.num_patches + 1, config.hidden_size))
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        if patches.shape[1] != self.num_patches:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} give {patches.shape[1]} patches; the encoder expects "
                f"{self.num_patches} (images must be preprocessed to the configured image_size)"
            )
        cls = self.cls_token.to(patches.dtype).expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)
        return self.pre_layernorm(tokens)


class MplugOwlVisionAttention(nn.Module):
    """Self-attention over all image tokens (no mask) with the per-head interleaved fused projection.

    The kernel follows ``attn_config._attn_implementation`` (the top-level model config).
    """

    def __init__(self, config: MplugOwlVisionConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.attn_config = attn_config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        qkv = self.query_key_value(hidden).reshape(batch, length, self.num_heads, 3, self.head_dim)
        query, key, value = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        context = attend(
            query, key, value, None, implementation=self.attn_config._attn_implementation, softmax_in_fp32=False
        )
        return self.dense(context.transpose(1, 2).reshape(batch, length, width))


class MplugOwlMLP(nn.Module):
    """fc2(QuickGELU(fc1(x)))."""

    def __init__(self, config: MplugOwlVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = QuickGELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


class MplugOwlVisionEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, config: MplugOwlVisionConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = MplugOwlVisionAttention(config, attn_config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MplugOwlMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class MplugOwlVisionEncoder(nn.Module):
    """The stack of encoder layers; checkpointed per layer when gradient checkpointing is enabled."""

    def __init__(self, config: MplugOwlVisionConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            MplugOwlVisionEncoderLayer(config, attn_config) for _ in range(config.num_hidden_layers)
        )
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = run_layer(self, layer, hidden)
        return hidden


class MplugOwlVisionModel(nn.Module):
    """pixel_values [B, 3, S, S] -> last_hidden_state [B, 1 + (S/14)^2, width] (post-LayerNorm on every token)."""

    def __init__(self, config: MplugOwlVisionConfig, attn_config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.embeddings = MplugOwlVisionEmbeddings(config)
        self.encoder = MplugOwlVisionEncoder(config, attn_config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
