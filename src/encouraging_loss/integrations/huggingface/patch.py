"""The fused linear encouraging loss inside a causal LM instance: :func:`apply_encouraging_loss`
(see :mod:`encouraging_loss.integrations.huggingface`)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from ..._validate import check_class_vector
from ...linear import linear_loss_with_options
from ...options import LinearLossOptions
from ...schedules import scheduled_options, take_schedules
from .trainer_loss import per_item

__all__ = [
    "EncouragingLossPatch",
    "apply_encouraging_loss",
    "encouraging_loss_applied",
    "remove_encouraging_loss",
]

# --- The fused loss inside a causal LM instance ------------------------------------------------

_PATCH_ATTRIBUTE = "_encouraging_loss_patch"
_MISSING = object()
# Options of the fused loss the patch takes: all of LinearLossOptions but the reduction, plus
# the per-class vectors.
_PATCH_OPTION_NAMES = tuple(
    name for name in LinearLossOptions.option_names() if name != "reduction"
) + ("class_weight", "bonus_weight")


class _SkippedLogits(torch.Tensor):
    """What the output projection returns while the fused loss stands in for it.

    A tensor with no elements that refuses every operation but reading its metadata and the
    casts a model applies to its logits before returning them (``float``, ``to``,
    ``contiguous``, which return it unchanged): a model that transforms its logits after the
    projection (Cohere's logit scale, a softcap other than its config's) fails with a clear
    error instead of training on a loss that ignores the transformation. For a model whose
    config softcaps the logits (``final_logit_softcapping``, Gemma 2), the fused loss applies
    that cap itself and this tensor passes the model's own ``logits / c``, ``tanh``,
    ``logits * c``, in that order, counting them in ``capped_steps``.
    """

    softcap: float | None
    capped_steps: int

    @staticmethod
    def __new__(cls, like: torch.Tensor, softcap: float | None = None, capped_steps: int = 0):
        with torch._C.DisableTorchFunctionSubclass():  # ``like`` may be one already
            empty = like.new_empty(0).detach()
        skipped = torch.Tensor._make_subclass(cls, empty, False)
        skipped.softcap, skipped.capped_steps = softcap, capped_steps
        return skipped

    @property
    def fully_capped(self) -> bool:
        """Whether the model applied its whole softcap (or has none)."""
        return self.capped_steps == (0 if self.softcap is None else len(SOFTCAP_STEPS))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if name in ("float", "to", "contiguous"):
            return args[0]
        if name in ("__get__", "dim", "size", "__repr__", "__format__"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        skipped = args[0] if args and isinstance(args[0], _SkippedLogits) else None
        if skipped is not None and skipped.softcap is not None and not kwargs:
            step = skipped.capped_steps
            names = SOFTCAP_STEPS[step] if step < len(SOFTCAP_STEPS) else ()
            operand = args[1:] == (skipped.softcap,) if "tanh" not in names else len(args) == 1
            if name in names and operand:
                return _SkippedLogits(skipped, skipped.softcap, step + 1)
        raise RuntimeError(
            f"the model applies {name!r} to its logits after the output projection; "
            "apply_encouraging_loss computes the loss of the projection itself (logits = "
            "lm_head(hidden), softcapped by the config's final_logit_softcapping) and cannot "
            "include that transformation: use remove_encouraging_loss(model) and "
            "Trainer(compute_loss_func=causal_lm_encouraging_loss(...)), which reads the "
            "model's logits"
        )


# The operations of a softcap c * tanh(z / c) as a model applies it to its logits, in order
# (the names torch's function hooks give them).
SOFTCAP_STEPS = (
    ("div", "__truediv__", "true_divide", "divide"),
    ("tanh",),
    ("mul", "__mul__", "__rmul__", "multiply"),
)


def _config_softcap(model) -> float | None:
    """The softcap the model's config puts on its logits (Gemma 2's ``final_logit_softcapping``)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return None if softcap is None else float(softcap)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None when autocast is off there."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no per-device queries
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def _check_causal_lm(model) -> nn.Linear:
    """The output projection of a ``transformers`` causal LM, or an error naming what is wrong."""
    if not isinstance(model, nn.Module) or not callable(
        getattr(model, "get_output_embeddings", None)
    ):
        raise TypeError(
            "model must be a transformers causal LM (a PreTrainedModel with "
            f"get_output_embeddings()), got {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model is an encoder-decoder ({type(model).__name__}): its labels are not shifted "
            "as a causal LM's are; apply_encouraging_loss supports causal LMs only"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    is_causal = any(cls.__name__ in causal_names for cls in type(model).__mro__)
    if not is_causal and getattr(model, "loss_type", None) != "ForCausalLM":
        raise ValueError(
            f"model must be a causal LM (a *ForCausalLM / *LMHeadModel class whose loss is "
            f"transformers' ForCausalLMLoss), got {type(model).__name__}"
        )
    return _output_projection(model)


def _output_projection(model) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(
            f"model.get_output_embeddings() is None: {type(model).__name__} has no output "
            "projection for the fused loss to use"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            "model.get_output_embeddings() must be a plain torch.nn.Linear (the fused loss "
            f"reads its weight and bias), got {type(head).__name__}"
        )
    return head


class EncouragingLossPatch:
    """The fused encouraging loss installed on one model; made by :func:`apply_encouraging_loss`.

    Attributes:
        model: the patched model.
        options: the :class:`~encouraging_loss.options.LinearLossOptions` in force (its
            ``reduction`` is replaced per call: ``"mean"``, or ``"sum"`` with
            ``num_items_in_batch``).
        class_weight, bonus_weight: the optional per-class vectors.
        fuse_in_eval: whether the fused loss also runs in evaluation mode.
    """

    def __init__(self, model, options: dict, fuse_in_eval: bool):
        options = dict(options)
        class_weight = options.pop("class_weight", None)
        bonus_weight = options.pop("bonus_weight", None)
        self.log_end_schedule, self.bonus_schedule = take_schedules(options)
        options.setdefault("validate_args", False)
        self.model_softcap = _config_softcap(model)
        if self.model_softcap is not None:
            given = options.get("softcap")
            if given is not None and given != self.model_softcap:
                raise ValueError(
                    f"softcap: the model caps its logits at {self.model_softcap:g} (its config's "
                    f"final_logit_softcapping), got softcap={given!r}; leave it out (the "
                    "model's cap is applied) or pass the same value"
                )
            options["softcap"] = self.model_softcap
        self.options = LinearLossOptions(**options)
        head = _output_projection(model)
        vocabulary = head.weight.shape[0]
        self.class_weight = check_class_vector("class_weight", class_weight, vocabulary,
                                               class_weight)  # fmt: skip
        self.bonus_weight = check_class_vector("bonus_weight", bonus_weight, vocabulary,
                                               bonus_weight)  # fmt: skip
        if not isinstance(fuse_in_eval, bool):
            raise TypeError(f"fuse_in_eval must be a bool, got {type(fuse_in_eval).__name__}")
        self.fuse_in_eval = fuse_in_eval
        self.model = model
        self._saved_forward = model.__dict__.get("forward", _MISSING)
        original = model.forward
        parameters = list(inspect.signature(original).parameters.values())
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY,
                                                              p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        labels_at = positional.index("labels") if "labels" in positional else None

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if self._active and (model.training or self.fuse_in_eval):
                if labels_at is not None and len(args) > labels_at:
                    if args[labels_at] is not None:
                        labels = args[labels_at]
                        args = (*args[:labels_at], None, *args[labels_at + 1 :])
                        return self._fused_forward(original, args, kwargs, labels)
                elif kwargs.get("labels") is not None:
                    labels = kwargs.pop("labels")
                    return self._fused_forward(original, args, kwargs, labels)
            return original(*args, **kwargs)

        self._forward = forward
        self._active = True

    def step(self, progress: float) -> None:
        """Set ``bonus_scale`` and ``log_end`` from their schedules at training progress [0, 1].

        Call it from a ``TrainerCallback`` (see ``docs/integrations.md``).
        """
        self.options = scheduled_options(
            self.options, progress, self.bonus_schedule, self.log_end_schedule
        )

    def remove(self) -> None:
        """Restore the model's own forward (as :func:`remove_encouraging_loss`)."""
        remove_encouraging_loss(self.model)

    def _fused_forward(self, original, args, kwargs, labels):
        """The model's forward with the projection replaced by the fused loss."""
        head = _output_projection(self.model)
        num_items = kwargs.get("num_items_in_batch")
        shift_labels = kwargs.get("shift_labels")
        losses = []

        def fused_head(hidden: torch.Tensor) -> torch.Tensor:
            losses.append(self._loss(hidden, head, labels, shift_labels, num_items))
            return _SkippedLogits(hidden, self.model_softcap)

        saved = head.__dict__.get("forward", _MISSING)
        head.forward = fused_head
        try:
            outputs = original(*args, **kwargs)
        finally:
            if saved is _MISSING:
                del head.forward
            else:
                head.forward = saved
        if len(losses) != 1:
            raise RuntimeError(
                f"{type(self.model).__name__}'s forward called its output projection "
                f"{len(losses)} times (expected once); apply_encouraging_loss cannot fuse it"
            )
        (loss,) = losses
        aux_loss = outputs.get("aux_loss") if not isinstance(outputs, tuple) else None
        if aux_loss is not None:
            # Mixture-of-experts models (output_router_logits=True) add their load-balancing
            # loss to the loss of the labels: ``loss += router_aux_loss_coef * aux_loss``.
            coefficient = getattr(self.model, "router_aux_loss_coef", None)
            if coefficient is None:
                raise RuntimeError(
                    f"{type(self.model).__name__} returns an aux_loss but has no "
                    "router_aux_loss_coef: apply_encouraging_loss cannot tell how it enters "
                    "the loss"
                )
            loss = loss + coefficient * aux_loss.to(loss.device)
        if isinstance(outputs, tuple):
            logits = outputs[0] if outputs else None
            if not isinstance(logits, _SkippedLogits):
                raise RuntimeError("the model's tuple output does not start with its logits")
        else:
            logits = outputs.get("logits")
            if not isinstance(logits, _SkippedLogits):
                raise RuntimeError("the model's output does not hold the projection's logits")
        if not logits.fully_capped:
            raise RuntimeError(
                f"{type(self.model).__name__}'s config softcaps its logits at "
                f"{self.model_softcap:g} (final_logit_softcapping) but its forward did not "
                "apply that cap as c * tanh(logits / c); apply_encouraging_loss cannot tell "
                "what loss the model means"
            )
        if isinstance(outputs, tuple):  # return_dict=False: (logits, ...) without a loss
            return (loss, *outputs[1:])
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        return type(outputs)(loss=loss, **fields)

    def _loss(self, hidden, head, labels, shift_labels, num_items) -> torch.Tensor:
        """``ForCausalLMLoss`` with the fused encouraging loss in place of cross-entropy."""
        weight, bias = head.weight, head.bias
        ignore_index = self.options.ignore_index
        if shift_labels is None:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
            # Position t predicts label t + 1; the last position has no label.
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(weight.device)
        hidden = hidden.to(weight.device)
        if shift_labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels must have the shape of the tokens projected, {tuple(hidden.shape[:-1])} "
                f"(batch, sequence), got {tuple(shift_labels.shape)} (with labels, pass "
                "logits_to_keep=0)"
            )
        dtype = _autocast_dtype(hidden.device.type)
        if dtype is not None:  # what autocast would have done to the projection
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        options = self.options.replace(reduction="mean" if num_items is None else "sum")
        class_weight, bonus_weight = (
            None if vector is None else vector.to(weight.device)
            for vector in (self.class_weight, self.bonus_weight)
        )
        with torch.autocast(hidden.device.type, enabled=False):
            loss = linear_loss_with_options(hidden, weight, shift_labels, bias, options,
                                            class_weight, bonus_weight)  # fmt: skip
        loss = loss.float()  # as ForCausalLMLoss, whose logits are upcast
        return loss if num_items is None else per_item(loss, num_items)


def apply_encouraging_loss(model, *, fuse_in_eval: bool = False, **loss_options):
    """Train a ``transformers`` causal LM with the fused linear encouraging loss, in place.

    Patches the *instance* (not its class): a forward with ``labels`` in training mode
    (``model.train()``, as ``Trainer`` does) computes the loss from the last hidden states and
    the output projection (``model.get_output_embeddings()``, its weight and bias) with
    :func:`~encouraging_loss.linear_encouraging_loss`, so the (tokens x vocabulary) logits are
    never formed. The semantics are those of ``transformers``' ``ForCausalLMLoss``:

    * labels are shifted (the hidden state at position t predicts ``labels[..., t + 1]``; pass
      them unshifted), or taken as they are from ``shift_labels=`` when the caller passes it;
      positions labelled ``ignore_index`` (-100) contribute nothing;
    * with ``num_items_in_batch`` (the ``Trainer`` passes the count of non-ignored labels of
      the whole gradient-accumulation batch) the loss is the sum over tokens divided by it, so
      that accumulated gradients are the large batch's; otherwise the mean over non-ignored
      tokens. The loss is float32, as the model's own.

    The model returns its usual output type with ``loss`` set and **``logits=None``** (in the
    tuple form, ``return_dict=False``, the logits are left out). Without labels, and in
    evaluation mode unless ``fuse_in_eval=True``, the model's own forward runs untouched:
    ``generate`` and evaluation get their logits, and the loss of an evaluation forward with
    labels is the model's own cross-entropy. ``Trainer(compute_loss_func=...)`` and
    ``TrainingArguments(label_smoothing_factor>0)`` take the labels out of the model's inputs
    and compute a loss from its logits: the patch then does nothing (use the
    ``label_smoothing`` option here instead).

    The model's forward must compute its logits as ``lm_head(hidden)`` (GPT-2, Llama, Qwen2,
    Mistral and most causal LMs do), or softcap them as its config says
    (``final_logit_softcapping``: Gemma 2; the fused loss then applies the same ``softcap``);
    a model that transforms them otherwise (a logit scale) raises an error naming the
    operation at its first labelled forward.

    Args:
        model: a ``transformers`` causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...) whose
            ``get_output_embeddings()`` is a ``torch.nn.Linear``.
        fuse_in_eval: also use the fused loss (and return no logits) for labelled forwards in
            evaluation mode.
        **loss_options: the options of :func:`~encouraging_loss.linear_encouraging_loss`
            (:class:`~encouraging_loss.options.LinearLossOptions`) but ``reduction``:
            ``log_end`` (0.75), ``bonus_scale`` (1; ``log_end`` and ``bonus_scale`` may be a
            :class:`~encouraging_loss.BonusSchedule`, advanced by
            :meth:`EncouragingLossPatch.step`), ``label_smoothing``, ``ignore_index`` (-100),
            ``bonus``, ``bonus_gamma``, ``bonus_start``, ``chunk_size``,
            ``accumulation_dtype``, ``backend``, ``z_loss``, ``softcap`` (set from the config's
            ``final_logit_softcapping`` when it has one; another value is refused),
            ``validate_args`` (``False`` here: the label range check would synchronise a GPU
            every step) and the (vocabulary,) tensors ``class_weight`` and ``bonus_weight``.
            Checked here.

    Returns:
        The :class:`EncouragingLossPatch` (``.step(progress)`` for schedules, ``.remove()``).

    Raises:
        TypeError, ValueError: a model that is not a causal LM, one without an ``nn.Linear``
            output projection, a model already patched, or a bad option (named).

    Example:
        >>> import torch, transformers
        >>> from encouraging_loss import encouraging_loss
        >>> from encouraging_loss.integrations.huggingface import (
        ...     apply_encouraging_loss, remove_encouraging_loss)
        >>> config = transformers.LlamaConfig(vocab_size=97, hidden_size=32,
        ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        >>> model = transformers.LlamaForCausalLM(config).train()
        >>> input_ids = torch.randint(0, 97, (2, 10))
        >>> with torch.no_grad():
        ...     logits = model(input_ids=input_ids).logits
        >>> patch = apply_encouraging_loss(model, log_end=0.75)
        >>> outputs = model(input_ids=input_ids, labels=input_ids)
        >>> outputs.loss.backward()
        >>> outputs.logits is None
        True
        >>> expected = encouraging_loss(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        >>> bool(torch.allclose(outputs.loss, expected, atol=1e-5))
        True
        >>> remove_encouraging_loss(model)
        >>> model(input_ids=input_ids, labels=input_ids).logits.shape
        torch.Size([2, 10, 97])
    """
    _check_causal_lm(model)
    if _PATCH_ATTRIBUTE in model.__dict__:
        raise ValueError(
            "model already has the encouraging loss applied; call remove_encouraging_loss(model) "
            "first to change its options"
        )
    if "reduction" in loss_options:
        raise ValueError(
            "reduction is chosen by the integration (sum / num_items_in_batch when the Trainer "
            "passes it, else the mean over non-ignored tokens); do not pass it"
        )
    unknown = sorted(set(loss_options) - set(_PATCH_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unknown loss option(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(_PATCH_OPTION_NAMES)}"
        )
    patch = EncouragingLossPatch(model, loss_options, fuse_in_eval)
    model.forward = patch._forward
    setattr(model, _PATCH_ATTRIBUTE, patch)
    return patch


def remove_encouraging_loss(model) -> None:
    """Undo :func:`apply_encouraging_loss`: the model's own forward (and loss) again.

    When something wrapped ``model.forward`` after the patch (``accelerate`` does, for mixed
    precision, when the ``Trainer`` prepares the model), that wrapper is kept and the patch's
    own layer under it becomes a pass-through: the model computes its own logits and loss again
    either way, and the encouraging loss can be applied again.

    Raises:
        ValueError: the model has no encouraging loss applied.

    Example:
        >>> import transformers
        >>> from encouraging_loss.integrations.huggingface import (
        ...     apply_encouraging_loss, remove_encouraging_loss)
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
        >>> _ = apply_encouraging_loss(model)
        >>> remove_encouraging_loss(model)
        >>> "forward" in vars(model)
        False
    """
    patch = model.__dict__.get(_PATCH_ATTRIBUTE) if isinstance(model, nn.Module) else None
    if patch is None:
        raise ValueError("model has no encouraging loss applied (see apply_encouraging_loss)")
    patch._active = False
    if model.__dict__.get("forward") is patch._forward:
        if patch._saved_forward is _MISSING:
            del model.forward
        else:
            model.forward = patch._saved_forward
    # Else a wrapper above the patch's forward calls it: it now passes every call through.
    delattr(model, _PATCH_ATTRIBUTE)


@contextlib.contextmanager
def encouraging_loss_applied(
    model, *, fuse_in_eval: bool = False, **loss_options
) -> Iterator[EncouragingLossPatch]:
    """:func:`apply_encouraging_loss` for the duration of a ``with`` block.

    Yields the :class:`EncouragingLossPatch`; the model's own forward is restored on exit, also
    when the block raises.

    Example:
        >>> import torch, transformers
        >>> from encouraging_loss.integrations.huggingface import encouraging_loss_applied
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)).train()
        >>> input_ids = torch.randint(0, 50, (2, 8))
        >>> with encouraging_loss_applied(model, log_end=0.5):
        ...     model(input_ids=input_ids, labels=input_ids).loss.backward()
        >>> model(input_ids=input_ids, labels=input_ids).logits.shape
        torch.Size([2, 8, 50])
    """
    patch = apply_encouraging_loss(model, fuse_in_eval=fuse_in_eval, **loss_options)
    try:
        yield patch
    finally:
        remove_encouraging_loss(model)
