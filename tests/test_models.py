"""Model families build from config values and produce the right logits."""

import pytest
import torch

from effitrain.errors import ConfigError
from effitrain.models.cnn import SmallCNN
from effitrain.models.mlp import MLP
from effitrain.models.zoo import torchvision_model
from effitrain.stages.base import build_model


def test_mlp_and_cnn_shapes() -> None:
    assert MLP((1, 8, 8), 10, hidden=(16,))(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert SmallCNN((3, 32, 32), 5, channels=(8, 16, 32))(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_torchvision_model_by_name() -> None:
    model = torchvision_model("resnet18", num_classes=7, input_shape=(3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        torchvision_model("resnet9000", num_classes=7)


def test_user_class_via_target() -> None:
    model = build_model({"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2})
    assert isinstance(model, torch.nn.Linear)
    with pytest.raises(ConfigError, match="has no parameters"):
        build_model({"_target_": "torch.nn.ReLU"})
