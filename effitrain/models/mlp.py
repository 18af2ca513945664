"""A multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from effitrain.errors import require


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear.

    Args:
        input_shape: shape of one input (flattened to prod(input_shape) features).
        num_classes: output logits.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,), dropout: float = 0.0) -> None:
        super().__init__()
        require(all(width >= 1 for width in hidden), "model.hidden", list(hidden), "widths >= 1")
        require(0 <= dropout < 1, "model.dropout", dropout, "a number in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for next_width in hidden:
            layers += [nn.Linear(width, next_width), nn.ReLU(), nn.Dropout(dropout)]
            width = next_width
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)
