"""Hugging Face ``transformers``: the encouraging loss as a ``Trainer`` loss for causal LMs.

``Trainer(compute_loss_func=...)`` calls ``loss_fn(outputs, labels, num_items_in_batch=...)``
with the model outputs (the model gets no labels, so it computes no loss of its own) and the
batch's labels. The functions here do what ``transformers``' own ``ForCausalLMLoss`` does, with
the encouraging loss in place of cross-entropy:

* labels are shifted: the logits at position t predict the label at t + 1 (the last position
  predicts nothing); positions labelled ``-100`` (padding, prompt tokens) are ignored;
* when the Trainer passes ``num_items_in_batch`` (the number of non-ignored label tokens in the
  whole gradient-accumulation batch) the loss is the *sum* over tokens divided by it, so that
  gradient accumulation gives the gradient of the large batch; otherwise it is the mean over
  non-ignored tokens.

With ``bonus_scale=0`` the result equals the model's own loss. This module does not import
``transformers``: it works on whatever the model returns (an object with ``.logits``, a mapping
with ``"logits"``, a tuple whose first element is the logits, or the logits tensor).
"""

from __future__ import annotations

import inspect

import torch

from ..modules import EncouragingLoss

__all__ = ["CausalLMEncouragingLoss", "causal_lm_encouraging_loss", "encouraging_causal_lm_loss"]

# Options of EncouragingLoss that the user may set; the reduction is the integration's to choose.
_OPTION_NAMES = tuple(
    name
    for name in inspect.signature(EncouragingLoss.__init__).parameters
    if name not in ("self", "size_average", "reduce", "reduction")
)


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

    Call: ``loss_fn(outputs, labels, num_items_in_batch=None)`` with outputs holding logits
    (batch, sequence, vocab), labels (batch, sequence) and ``num_items_in_batch`` an int or a
    0-d tensor (the Trainer's count of non-ignored labels); returns the scalar loss.

    Example:
        >>> import torch
        >>> from encouraging_loss.integrations.huggingface import CausalLMEncouragingLoss
        >>> loss_fn = CausalLMEncouragingLoss(log_end=0.75)
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
        >>> loss = loss_fn({"logits": logits}, labels, num_items_in_batch=7)
        >>> loss.backward()
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

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = logits_of(outputs)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
            raise ValueError(
                "logits must have shape (..., sequence, vocab) and labels (..., sequence), got "
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        ignore_index = self.criterion.ignore_index
        # Position t predicts label t + 1; the last position has no label.
        shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shifted = shifted.to(logits.device).reshape(-1)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        if num_items_in_batch is None:
            return self.criterion(flat_logits, shifted)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(logits.device)
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
            raise TypeError(
                "num_items_in_batch must be an int, a tensor or None, "
                f"got {type(num_items_in_batch).__name__}"
            )
        return self.summed(flat_logits, shifted) / num_items_in_batch


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
