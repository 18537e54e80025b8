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

:func:`apply_encouraging_loss` goes further for large vocabularies: it patches a causal LM
*instance* so that a training forward with ``labels`` computes the fused linear encouraging loss
(:func:`~encouraging_loss.linear_encouraging_loss`) from the last hidden states and the output
projection, with the same semantics, and never forms the (tokens x vocabulary) logits.
:func:`remove_encouraging_loss` and :func:`encouraging_loss_applied` restore the model. Only
these import ``transformers`` (when called).
"""

from .patch import (
    EncouragingLossPatch,
    apply_encouraging_loss,
    encouraging_loss_applied,
    remove_encouraging_loss,
)
from .trainer_loss import (
    CausalLMEncouragingLoss,
    causal_lm_encouraging_loss,
    encouraging_causal_lm_loss,
    logits_of,
    per_item,
)

__all__ = [
    "CausalLMEncouragingLoss",
    "EncouragingLossPatch",
    "apply_encouraging_loss",
    "causal_lm_encouraging_loss",
    "encouraging_causal_lm_loss",
    "encouraging_loss_applied",
    "logits_of",
    "per_item",
    "remove_encouraging_loss",
]
