"""The encouraging loss (Zhao et al., AAAI 2022) as a drop-in for ``torch.nn.CrossEntropyLoss``."""

from .bonus import Bonus
from .functional import encouraging_loss

__all__ = ["Bonus", "encouraging_loss"]

__version__ = "0.1.0"
