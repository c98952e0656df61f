"""Attention kernels shared by the vision encoder, the abstractor and the LLM.

``implementation`` follows ``config._attn_implementation``: "eager" reproduces the original arithmetic step by step,
anything else uses ``torch.nn.functional.scaled_dot_product_attention`` (same result in fp32 within float rounding),
and the LLM additionally routes "flash_attention_2" to flash-attn when it is installed (``flash.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive_mask: torch.Tensor | None,
    *,
    implementation: str,
    softmax_in_fp32: bool,
    is_causal: bool = False,
) -> torch.Tensor:
    """Multi-head attention on [B, heads, L, head_dim] tensors; returns [B, heads, L_query, head_dim].

    ``additive_mask`` broadcasts to [B, heads, L_query, L_key] (0 = attend, a very negative number = masked).
    ``is_causal`` may only be set without a mask and with L_query == L_key. ``softmax_in_fp32`` selects the LLM's
    eager arithmetic (softmax in float32, then cast back); the vision encoder and abstractor softmax in the working
    dtype, as in the original.
    """
    if implementation != "eager":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask, is_causal=is_causal)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if is_causal:
        length = query.shape[-2]
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    if additive_mask is not None:
        scores = scores + additive_mask
    if softmax_in_fp32:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value)


def run_layer(stack: torch.nn.Module, layer: torch.nn.Module, *inputs):
    """``layer(*inputs)``, through ``stack``'s gradient checkpointing when that is enabled and ``stack`` is training."""
    if stack.gradient_checkpointing and stack.training:
        return stack._gradient_checkpointing_func(layer.__call__, *inputs)
    return layer(*inputs)
