"""The encouraging loss (Zhao et al., AAAI 2022) as a drop-in for ``torch.nn.CrossEntropyLoss``.

Example:
    >>> import torch
    >>> from encouraging_loss import EncouragingLoss
    >>> criterion = EncouragingLoss(log_end=0.75)
    >>> loss = criterion(torch.randn(4, 10, requires_grad=True), torch.tensor([1, 0, 4, 9]))
"""

from .binary import binary_encouraging_loss_with_logits
from .bonus import Bonus
from .functional import encouraging_loss
from .linear import LinearEncouragingLoss, linear_encouraging_loss
from .modules import BinaryEncouragingLoss, EncouragingLoss, FocalLoss, Poly1Loss
from .ops.library import encouraging_loss_op, linear_encouraging_loss_op
from .peers import focal_loss, poly1_loss
from .schedules import BonusSchedule
from .vocab_parallel import (
    VocabParallelEncouragingLoss,
    vocab_parallel_encouraging_loss,
    vocab_parallel_linear_encouraging_loss,
)

__all__ = [
    "BinaryEncouragingLoss",
    "Bonus",
    "BonusSchedule",
    "EncouragingLoss",
    "FocalLoss",
    "LinearEncouragingLoss",
    "Poly1Loss",
    "VocabParallelEncouragingLoss",
    "binary_encouraging_loss_with_logits",
    "encouraging_loss",
    "encouraging_loss_op",
    "focal_loss",
    "linear_encouraging_loss",
    "linear_encouraging_loss_op",
    "poly1_loss",
    "vocab_parallel_encouraging_loss",
    "vocab_parallel_linear_encouraging_loss",
]

__version__ = "0.1.0"
