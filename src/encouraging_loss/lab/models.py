"""Architectures shared by the lab's tasks: an MLP, two small CNNs and ResNet-18 with a CIFAR stem.

Every model exposes ``features(x)`` (the penultimate representation, used by the linear probe
and classifier re-training) and ``classifier`` (the last ``nn.Linear``), so diagnostics need not
know the architecture.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS = ("mlp", "cnn", "demo-cnn", "resnet18")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A size-preserving 3x3 convolution (no bias), batch norm and ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class _Classifier(nn.Module):
    """A ``body`` giving the penultimate representation, then a linear ``classifier``.

    Args:
        num_classes: number of classes (at least 2).
        sizes: sizes by argument name, each of which must be positive.
    """

    def __init__(self, num_classes: int, **sizes: int):
        super().__init__()
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        if num_classes < 2:
            raise ValueError(f"num_classes: must be at least 2, got {num_classes}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation ``(N, classifier.in_features)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class MLP(_Classifier):
    """Fully connected network: flatten, hidden ReLU layers, linear classifier.

    Args:
        in_features: flattened input size, e.g. 784.
        hidden: sizes of the hidden layers.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__(num_classes, in_features=in_features)
        if not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"hidden: needs at least one positive size, got {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)


class SmallCNN(_Classifier):
    """Two conv blocks (32, 64 channels, each conv-BN-ReLU-maxpool), a 128-unit layer, classifier.

    Args:
        in_channels: input channels (1 for MNIST-like, 3 for CIFAR).
        image_size: input height (= width); must be divisible by 4.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28):
        super().__init__(num_classes, in_channels=in_channels)
        if image_size <= 0 or image_size % 4:
            raise ValueError(f"image_size: must be a positive multiple of 4, got {image_size}")
        self.body = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(128, num_classes)


class DemoCNN(_Classifier):
    """The MNIST CNN of the torchattacks demos, on which the paper attacks CE and EL models.

    Three 5x5 convolutions without padding or batch norm (16, 32, 64 channels, ReLU, a 2x2
    max-pool after the second and the third), a 100-unit layer, classifier: on 28x28 images
    ``Conv(1,16,5)-Conv(16,32,5)-MaxPool-Conv(32,64,5)-MaxPool-FC(64*3*3,100)-FC(100,10)``.

    Args:
        in_channels: input channels.
        image_size: input height (= width); at least 20, so that the last map is not empty.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28):
        super().__init__(num_classes, in_channels=in_channels)
        if image_size < 20:
            raise ValueError(f"image_size: must be at least 20, got {image_size}")
        side = ((image_size - 8) // 2 - 4) // 2  # two unpadded 5x5 convs, pool, conv, pool
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5),
            nn.ReLU(),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, 100),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(100, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity or 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual output."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(_Classifier):
    """ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool).

    Args:
        in_channels: input channels.
        width: channels of the first stage (64 in the standard network).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__(num_classes, in_channels=in_channels, width=width)
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        stages = []
        in_planes = width
        for index, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if index == 0 else 2
            stages += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation ``(N, 8 * width)`` after global average pooling."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a freshly initialised model (following the global torch seed) by name.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"demo-cnn"`` or ``"resnet18"``.
        input_shape: shape of one example, ``(C, H, W)``.

    Raises:
        ValueError: for an unknown name or a malformed ``input_shape``.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape: expected (C, H, W), got {input_shape}")
    channels, height, width = input_shape
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes)
    if name == "cnn":
        if height != width:
            raise ValueError(f"input_shape: cnn needs square images, got {input_shape}")
        return SmallCNN(channels, num_classes, image_size=height)
    if name == "demo-cnn":
        if height != width:
            raise ValueError(f"input_shape: demo-cnn needs square images, got {input_shape}")
        return DemoCNN(channels, num_classes, image_size=height)
    if name == "resnet18":
        return ResNet18(channels, num_classes)
    raise ValueError(f"name: unknown model {name!r}; known: {', '.join(MODELS)}")
