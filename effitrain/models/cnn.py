"""A small convolutional network for low-resolution images (digits' 8x8, CIFAR's 32x32)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from effitrain.errors import require


class SmallCNN(nn.Module):
    """[Conv3x3 -> BatchNorm -> ReLU] blocks (max-pool after each but the last) -> global
    average pool -> Linear -> ReLU -> Dropout -> Linear.

    Args:
        input_shape: (channels, height, width) of one input.
        num_classes: output logits.
        channels: output channels of each conv block.
        hidden: width of the hidden fully connected layer.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        require(len(input_shape) == 3, "model.input_shape", list(input_shape), "[channels, height, width]")
        require(bool(channels) and all(width >= 1 for width in channels), "model.channels", list(channels), "widths >= 1")
        require(hidden >= 1, "model.hidden", hidden, "an integer >= 1")
        require(0 <= dropout < 1, "model.dropout", dropout, "a number in [0, 1)")
        blocks: list[nn.Module] = []
        in_channels = input_shape[0]
        for index, out_channels in enumerate(channels):
            blocks += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]
            if index < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(inputs)))
