"""The encouraging loss as a ``Trainer(compute_loss_func=...)`` loss of causal LMs, from the
model's logits (see :mod:`encouraging_loss.integrations.huggingface`)."""

from __future__ import annotations

import inspect

import torch

from ...modules import EncouragingLoss

__all__ = [
    "CausalLMEncouragingLoss",
    "causal_lm_encouraging_loss",
    "encouraging_causal_lm_loss",
    "logits_of",
    "per_item",
]

# Options of EncouragingLoss that the user may set; the reduction is the integration's to choose.
_OPTION_NAMES = tuple(
    name
    for name in inspect.signature(EncouragingLoss.__init__).parameters
    # return_lse changes what the criterion returns: the Trainer wants the loss alone.
    if name not in ("self", "size_average", "reduce", "reduction", "return_lse")
)


def per_item(summed: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """A summed loss divided by ``num_items_in_batch`` (transformers' count of the labelled
    tokens of the whole accumulated batch, an int or a tensor).

    Raises:
        TypeError: for a count that is neither an int nor a tensor.
    """
    if isinstance(num_items_in_batch, torch.Tensor):
        return summed / num_items_in_batch.to(summed.device)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
        raise TypeError(
            "num_items_in_batch must be an int, a tensor or None, "
            f"got {type(num_items_in_batch).__name__}"
        )
    return summed / num_items_in_batch


def logits_of(outputs) -> torch.Tensor:
    """The logits in a model's outputs (ModelOutput, mapping, tuple or tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "outputs must be the logits tensor or hold it (as .logits, ['logits'] or [0]), "
            f"got {type(outputs).__name__}"
        )
    return logits


class CausalLMEncouragingLoss:
    """A ``Trainer(compute_loss_func=...)`` loss: the encouraging loss of next-token prediction.

    Args:
        **el_options: options of :class:`~encouraging_loss.EncouragingLoss` (``log_end``,
            ``bonus_scale`` (a number or a :class:`~encouraging_loss.BonusSchedule`),
            ``label_smoothing``, ``weight``, ``ignore_index`` (default -100), ``bonus``, ...),
            all but ``reduction``, which follows the Trainer (see the module docstring).
            ``validate_args`` defaults to ``False`` here: the range check reads the labels and
            would synchronise a GPU every step.

    Call: ``loss_fn(outputs, labels, num_items_in_batch=None, token_weight=None)`` with outputs
    holding logits (batch, sequence, vocab), labels (batch, sequence) and ``num_items_in_batch``
    an int or a 0-d tensor (the Trainer's count of non-ignored labels); returns the scalar loss.
    ``token_weight`` (for a ``compute_loss`` of one's own; the ``Trainer`` passes none): optional
    (batch, sequence) per-label weights, shifted with ``labels``; the loss is their weighted
    mean, or with ``num_items_in_batch`` the weighted sum divided by it.

    Example:
        >>> import torch
        >>> from encouraging_loss.integrations.huggingface import CausalLMEncouragingLoss
        >>> loss_fn = CausalLMEncouragingLoss(log_end=0.75)
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
        >>> loss = loss_fn({"logits": logits}, labels, num_items_in_batch=7)
        >>> loss.backward()
        >>> weights = torch.tensor([[1.0, 1.0, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
        >>> loss_fn({"logits": logits}, labels, token_weight=weights).shape
        torch.Size([])
    """

    def __init__(self, **el_options):
        unknown = sorted(set(el_options) - set(_OPTION_NAMES))
        if "reduction" in el_options:
            raise ValueError(
                "reduction is chosen by the Trainer integration (sum / num_items_in_batch, else "
                "the mean over non-ignored tokens); do not pass it"
            )
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(_OPTION_NAMES)}"
            )
        el_options.setdefault("validate_args", False)
        self.criterion = EncouragingLoss(**el_options)
        self.summed = EncouragingLoss(**el_options, reduction="sum")

    def step(self, progress: float) -> None:
        """Advance ``bonus_scale`` / ``log_end`` schedules to training progress in [0, 1]."""
        self.criterion.step(progress)
        self.summed.step(progress)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None,
                 token_weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        logits = logits_of(outputs)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                "logits must have shape (..., sequence, vocab) and labels (..., sequence), got "
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        if token_weight is not None and getattr(token_weight, "shape", None) != labels.shape:
            shape = tuple(getattr(token_weight, "shape", ())) or type(token_weight).__name__
            raise ValueError(f"token_weight must be a tensor of the labels' shape "
                             f"{tuple(labels.shape)}, got {shape}")  # fmt: skip
        # Position t predicts label t + 1 (its weight with it); the last position has no label.
        shifted, token_weight = (
            None if t is None else _next(t, fill).to(logits.device).reshape(-1)
            for t, fill in ((labels, self.criterion.ignore_index), (token_weight, 0))
        )
        flat_logits = logits.reshape(-1, logits.shape[-1])
        if num_items_in_batch is None:
            return self.criterion(flat_logits, shifted, token_weight)
        return per_item(self.summed(flat_logits, shifted, token_weight), num_items_in_batch)


def _next(tensor: torch.Tensor, fill) -> torch.Tensor:
    """``tensor`` moved one position left along the sequence, ``fill`` at the end."""
    return torch.nn.functional.pad(tensor, (0, 1), value=fill)[..., 1:]


def causal_lm_encouraging_loss(**el_options) -> CausalLMEncouragingLoss:
    """A loss for ``Trainer(compute_loss_func=...)`` with the given encouraging-loss options.

    Args:
        **el_options: see :class:`CausalLMEncouragingLoss`.

    Returns:
        The callable ``loss_fn(outputs, labels, num_items_in_batch=None)``.

    Example:
        >>> from encouraging_loss.integrations.huggingface import causal_lm_encouraging_loss
        >>> loss_fn = causal_lm_encouraging_loss(log_end=0.75, label_smoothing=0.1)
        >>> # trainer = transformers.Trainer(model, args, train_dataset=data,
        >>> #                                compute_loss_func=loss_fn)
    """
    return CausalLMEncouragingLoss(**el_options)


def encouraging_causal_lm_loss(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    """The default-options loss (log bonus, ``log_end=0.75``) for ``compute_loss_func``.

    Example:
        >>> import torch
        >>> from encouraging_loss.integrations.huggingface import encouraging_causal_lm_loss
        >>> logits = torch.randn(1, 4, 6)
        >>> loss = encouraging_causal_lm_loss(logits, torch.tensor([[0, 1, 2, 3]]))
        >>> loss.shape
        torch.Size([])
    """
    return _DEFAULT(outputs, labels, num_items_in_batch)


_DEFAULT = CausalLMEncouragingLoss()
