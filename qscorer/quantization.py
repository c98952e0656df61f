"""8-bit and 4-bit weights for the language model's linear layers (bitsandbytes, the ``quant`` extra).

What is quantized: every linear layer of the LLM's decoder layers (attention and MLP projections, both modality
branches), i.e. about 92% of the 7B model's weights. What is not: the embeddings, ``lm_head``, the norms, the
regression head, the vision encoder and the abstractor, which stay in the compute dtype. Modes follow the original
builder's options: ``load_8bit`` is LLM.int8() with outlier threshold 6.0; ``load_4bit`` is NF4 with double
quantization. bitsandbytes runs both on CUDA and on CPU.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from .errors import QScorerError

INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold (transformers' default for ``load_in_8bit``, which the original used)."""
QUANTIZED_PREFIX = "model.layers."
"""Linear layers under this module path are quantized."""
MALLOC_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter M_MMAP_THRESHOLD."""


def quantization_mode(load_8bit: bool, load_4bit: bool) -> str | None:
    """ "8bit", "4bit" or None; both at once is an error."""
    if load_8bit and load_4bit:
        raise QScorerError("choose one of load_8bit / load_4bit (--load-8bit / --load-4bit), not both")
    return "8bit" if load_8bit else "4bit" if load_4bit else None


def bitsandbytes():
    """The bitsandbytes module, or an error saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise QScorerError("8-bit / 4-bit loading needs bitsandbytes: pip install 'qscorer[quant]'") from error
    return bitsandbytes


def limit_heap_fragmentation() -> None:
    """On glibc, serve allocations above 4 MiB with mmap, so that they go back to the system when freed.

    Quantizing, and bitsandbytes' CPU kernels (4-bit repacks each weight on its first call), allocate many
    short-lived tensors of a few MiB; from glibc's heap they leave it fragmented (measured: about 0.4 bytes per
    quantized parameter kept after the first forward). This is a process-wide allocator setting; elsewhere it is a
    no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(MALLOC_MMAP_THRESHOLD, 4 * 1024 * 1024)


class _Int8CastNotice(logging.Filter):
    """LLM.int8() multiplies in float16 and logs so at every call when the compute dtype differs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, _Int8CastNotice) for existing in logger.filters):
        logger.addFilter(_Int8CastNotice())


def is_quantized(name: str, module: nn.Module) -> bool:
    """True for the linear layers that :func:`quantized_linear` replaces."""
    return isinstance(module, nn.Linear) and name.startswith(QUANTIZED_PREFIX)


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A bitsandbytes linear layer holding ``weight`` [out, in] quantized on ``device``.

    ``weight`` (on any device) is cast to ``compute_dtype`` first (the LoRA delta is already merged into it, in
    float32).
    """
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    # Int8Params quantizes only when it is moved from the CPU: a weight already on the GPU would stay in float16.
    weight = weight.to("cpu" if mode == "8bit" else weight.device, compute_dtype)
    with torch.device("meta"):
        if mode == "8bit":
            layer = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD
            )
        else:
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
    if mode == "8bit":
        _quiet_int8_cast_notice()
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return layer.to(device)
