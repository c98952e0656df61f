"""8-bit and 4-bit weights for the language model's linear layers (bitsandbytes, the ``quant`` extra).

What is quantized: every linear layer of the LLM's decoder layers (attention and MLP projections, both modality
branches), i.e. about 92% of the 7B model's weights. What is not: the embeddings, ``lm_head``, the norms, the
regression head, the vision encoder and the abstractor, which stay in the compute dtype. Modes follow the original
builder's options: ``load_8bit`` is LLM.int8() with outlier threshold 6.0; ``load_4bit`` is NF4 with double
quantization. bitsandbytes runs both on CUDA and on CPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import QScorerError

MODES = ("8bit", "4bit")
INT8_THRESHOLD = 6.0
"""LLM.int8() outlier threshold (transformers' default for ``load_in_8bit``, which the original used)."""
QUANTIZED_PREFIX = "model.layers."
"""Linear layers under this module path are quantized."""


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


def is_quantized(name: str, module: nn.Module) -> bool:
    """True for the linear layers that :func:`quantized_linear` replaces."""
    return isinstance(module, nn.Linear) and name.startswith(QUANTIZED_PREFIX)


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """A bitsandbytes linear layer holding ``weight`` [out, in] quantized on ``device``.

    ``weight`` is cast to ``compute_dtype`` first (the LoRA delta is already merged into it, in float32).
    """
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    weight = weight.to(compute_dtype)
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
        # LLM.int8() multiplies in float16 and says so at every call when the compute dtype differs.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    return layer.to(device)
