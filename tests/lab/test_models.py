"""Model shapes and the features/classifier interface diagnostics rely on."""

from __future__ import annotations

import pytest
import torch

from encouraging_loss.lab.models import MLP, ResNet18, SmallCNN, build_model


@pytest.mark.parametrize(
    ("name", "shape", "feature_dim"),
    [
        ("mlp", (1, 28, 28), 256),
        ("cnn", (1, 28, 28), 128),
        ("cnn", (3, 32, 32), 128),
        ("resnet18", (3, 32, 32), 512),
    ],
)
def test_shapes(name, shape, feature_dim):
    model = build_model(name, shape, 10)
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, feature_dim)
    assert model.classifier.in_features == feature_dim


def test_resnet18_parameter_count():
    # ResNet-18 for CIFAR-10 has about 11.2 M parameters.
    count = sum(p.numel() for p in ResNet18().parameters())
    assert 11_000_000 < count < 11_300_000


def test_invalid_arguments():
    with pytest.raises(ValueError, match="name"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="num_classes"):
        MLP(784, 1)
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(1, 10, image_size=30)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (784,), 10)
