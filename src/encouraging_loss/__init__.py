"""The encouraging loss (Zhao et al., AAAI 2022) as a drop-in for ``torch.nn.CrossEntropyLoss``."""

__version__ = "0.1.0"
