"""Q-Scorer's regression head: a small MLP from the LLM hidden state to one quality score."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLPBlock(nn.Module):
    """relu(linear(x)), plus x when the block keeps the width (never the case for the default [2048, 1024])."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.residual = in_features == out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = torch.relu(self.linear(hidden))
        return output + hidden if self.residual else output


class DeepMLP(nn.Module):
    """hidden [..., in] -> score [...]: ``model`` (one block per hidden width) then ``output_layer`` to one unit."""

    def __init__(self, in_features: int, hidden_dims: list[int], out_features: int = 1):
        super().__init__()
        widths = [in_features, *hidden_dims]
        self.model = nn.Sequential(*(ResidualMLPBlock(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.output_layer = nn.Linear(widths[-1], out_features)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.model(hidden)).squeeze(-1)
