"""flash-attn 2 kernel for the LLM (optional extra ``qscorer[flash]``; CUDA, fp16/bf16 only).

Padded batches are unpadded to variable-length sequences. Causal masks in flash-attn >= 2.1 are aligned to the
bottom-right corner, which is what a query block appended to a KV cache needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_flash_attn_available() -> bool:
    """Whether the flash-attn package imports (it needs CUDA to run)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _cumulative_lengths(mask: torch.Tensor) -> torch.Tensor:
    return F.pad(mask.sum(-1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Causal attention on [B, heads, L, head_dim] tensors; ``attention_mask`` [B, L_key] marks real tokens."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs flash-attn: pip install 'qscorer[flash]' "
            "(or load with attn_implementation='sdpa')"
        ) from error
    query, key, value = (tensor.transpose(1, 2) for tensor in (query, key, value))
    if attention_mask is None or bool(attention_mask.all()):
        return flash_attn_func(query, key, value, causal=True).transpose(1, 2)

    batch, query_length, heads, head_dim = query.shape
    key_mask = attention_mask.bool()
    query_mask = key_mask[:, -query_length:]
    query_index = query_mask.flatten().nonzero().squeeze(-1)
    key_index = key_mask.flatten().nonzero().squeeze(-1)
    output = flash_attn_varlen_func(
        query.reshape(-1, heads, head_dim)[query_index],
        key.reshape(-1, key.shape[2], head_dim)[key_index],
        value.reshape(-1, value.shape[2], head_dim)[key_index],
        _cumulative_lengths(query_mask),
        _cumulative_lengths(key_mask),
        int(query_mask.sum(-1).max()),
        int(key_mask.sum(-1).max()),
        causal=True,
    )
    padded = query.new_zeros(batch * query_length, heads, head_dim)
    padded[query_index] = output
    return padded.view(batch, query_length, heads, head_dim).transpose(1, 2)
