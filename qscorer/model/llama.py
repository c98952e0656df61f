"""Modality-adaptive LLaMA layers of mPLUG-Owl2, written from scratch.

``k_proj``, ``v_proj``, ``input_layernorm`` and ``post_attention_layernorm`` have two branches (``multiway.0`` for
text tokens, ``multiway.1`` for visual tokens) chosen per token by the modality indicators; everything else is
shared. RoPE uses the rotate-half convention; RMSNorm normalises in float32.

A KV cache is a tuple with one ``(key, value)`` pair per layer, each [B, kv_heads, length, head_dim], keys already
rotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .configuration import MPLUGOwl2Config
from .flash import flash_attention

KeyValue = tuple[torch.Tensor, torch.Tensor]


class MPLUGOwl2RMSNorm(nn.Module):
    """weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden32 = hidden.to(torch.float32)
        hidden32 = hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden32.to(dtype)


class MultiwayNetwork(nn.Module):
    """Two copies of a module; token t goes through ``multiway[indicator[t]]`` (0 = text, 1 = visual).

    Any non-zero indicator counts as visual, so no output position is ever left unset (the original filled its
    output with ``torch.empty`` and left positions with other values uninitialised).
    """

    def __init__(self, module_factory):
        super().__init__()
        self.multiway = nn.ModuleList([module_factory(), module_factory()])

    def forward(self, hidden: torch.Tensor, modality_indicators: torch.Tensor) -> torch.Tensor:
        visual = modality_indicators.bool()
        if not visual.any():
            return self.multiway[0](hidden)
        if visual.all():
            return self.multiway[1](hidden)
        text_output = self.multiway[0](hidden[~visual])
        visual_output = self.multiway[1](hidden[visual])
        output = text_output.new_empty(*visual.shape, text_output.shape[-1])
        output[~visual] = text_output
        output[visual] = visual_output
        return output


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables [B, L, head_dim] for the positions, computed in float32 and cast to ``dtype``.

    inv_freq = 1 / theta^(arange(0, head_dim, 2) / head_dim); angles are duplicated (concat(freqs, freqs)) to
    match rotate_half.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    )
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(hidden: torch.Tensor) -> torch.Tensor:
    """concat(-x[half:], x[:half]) over the last dimension."""
    first, second = hidden.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, heads, L, head_dim] with cos/sin [B, L, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    return hidden * cos + rotate_half(hidden) * sin


class MPLUGOwl2Attention(nn.Module):
    """Causal self-attention with a shared q_proj / o_proj and per-modality k_proj / v_proj."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        width, kv_width = config.hidden_size, self.num_key_value_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = MultiwayNetwork(lambda: nn.Linear(width, kv_width, bias=bias))
        self.v_proj = MultiwayNetwork(lambda: nn.Linear(width, kv_width, bias=bias))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=bias)

    def forward(
        self,
        hidden: torch.Tensor,
        modality_indicators: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        additive_mask: torch.Tensor | None,
        past_key_value: KeyValue | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Returns the attention output and this layer's (key, value) including the past.

        ``attention_mask`` is the 2-D padding mask over past + current tokens (used by flash-attn);
        ``additive_mask`` is the 4-D mask for eager / SDPA (None = plain causal, or no mask for one query).
        """
        batch, length, _ = hidden.shape
        query = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden, modality_indicators)
        value = self.v_proj(hidden, modality_indicators)
        key = key.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value)
        repeats = self.num_heads // self.num_key_value_heads
        if repeats > 1:
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)

        implementation = self.config._attn_implementation
        if implementation.startswith("flash_attention"):
            context = flash_attention(query, key, value, attention_mask)
        else:
            is_causal = additive_mask is None and length > 1
            context = attend(
                query,
                key,
                value,
                additive_mask,
                implementation=implementation,
                softmax_in_fp32=True,
                is_causal=is_causal,
            )
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(context), present


class MPLUGOwl2MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), shared by both modalities."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class MPLUGOwl2DecoderLayer(nn.Module):
    """Pre-norm LLaMA block with modality-adaptive norms and key/value projections."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MPLUGOwl2Attention(config)
        self.mlp = MPLUGOwl2MLP(config)
        self.input_layernorm = MultiwayNetwork(lambda: MPLUGOwl2RMSNorm(width, eps))
        self.post_attention_layernorm = MultiwayNetwork(lambda: MPLUGOwl2RMSNorm(width, eps))

    def forward(self, hidden: torch.Tensor, modality_indicators: torch.Tensor, *attention_inputs):
        """``attention_inputs``: the rest of :meth:`MPLUGOwl2Attention.forward`'s arguments (rotary, the two masks,
        the past key / value); returns the new hidden states and this layer's (key, value)."""
        normed = self.input_layernorm(hidden, modality_indicators)
        attention_output, present = self.self_attn(normed, modality_indicators, *attention_inputs)
        hidden = hidden + attention_output
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden, modality_indicators))
        return hidden, present


def additive_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, dtype: torch.dtype, device
) -> torch.Tensor | None:
    """The 4-D mask [B, 1, query_length, past_length + query_length] for eager / SDPA attention, or None.

    None means "no mask needed": plain causal attention without padding (the kernel applies causality itself) or
    a single query that may see everything. Masked entries hold the dtype's minimum (finite, so rows that see
    nothing, i.e. padding queries, give finite values instead of NaN).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past_length == 0 or query_length == 1):
        return None
    key_length = past_length + query_length
    query_positions = torch.arange(past_length, key_length, device=device)[:, None]
    allowed = torch.arange(key_length, device=device)[None, :] <= query_positions
    allowed = allowed[None, None]
    if padded:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def position_ids_for(
    attention_mask: torch.Tensor | None, batch: int, query_length: int, past_length: int, device
) -> torch.Tensor:
    """Positions of the current tokens: 0-based counts of the valid tokens before them (padding-aware).

    With right padding (or none) this is ``past_length + arange(query_length)`` for every real token, as in the
    original; with left padding the first real token still gets position 0.
    """
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -query_length:]
