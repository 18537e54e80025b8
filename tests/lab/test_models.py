"""Model shapes and the features/classifier interface diagnostics rely on."""

from __future__ import annotations

import pytest
import torch

from encouraging_loss.lab.models import MLP, DemoCNN, ResNet18, SmallCNN, build_model


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


def test_demo_cnn_is_the_torchattacks_demo_network():
    model = build_model("demo-cnn", (1, 28, 28), 10)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, 100)
    # Conv(1,16,5), Conv(16,32,5), Conv(32,64,5), FC(64*3*3,100), FC(100,10): weights + biases.
    expected = (16 * 25 + 16) + (32 * 16 * 25 + 32) + (64 * 32 * 25 + 64) + (576 * 100 + 100)
    expected += 100 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert build_model("demo-cnn", (3, 32, 32), 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="image_size"):
        DemoCNN(1, 10, image_size=19)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("demo-cnn", (1, 28, 30), 10)
