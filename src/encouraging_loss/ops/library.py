"""The encouraging loss as PyTorch custom operators (``torch.library``).

Registered when :mod:`encouraging_loss` is imported: ``torch.ops.encouraging_loss.encouraging_loss``
and ``torch.ops.encouraging_loss.linear_encouraging_loss`` take the arguments (keyword-only after
the cross-entropy ones) and give the results of :func:`encouraging_loss.encouraging_loss` and
:func:`encouraging_loss.linear_encouraging_loss`.

:func:`encouraging_loss_op` and :func:`linear_encouraging_loss_op` call them with the signatures
(and checks) of the Python functions. An operator is one node in ``torch.compile``,
``torch.export`` and FX graphs: the compiled graph calls the eager implementation, so its
checks (the target range with ``validate_args``) and, on CUDA, the Triton kernels
(``backend="auto"``, launched eagerly inside the operator) run inside compiled code too, where
the plain functions trace into the graph as torch operations (opaque to the compiler here: the
kernels' own ``torch.library.triton_op``, which ``backend="triton"`` uses under
``torch.compile``, is in :mod:`.triton_library`).

How: each public operator is ``CompositeImplicitAutograd`` over a ``custom_op`` that returns the
loss *and* its gradient for a unit incoming gradient, computed by the library's own autograd
Functions (:mod:`.small`, :mod:`.rowwise`, :mod:`.smoothed`, :mod:`.fused_linear`), which build
the gradient in the forward pass anyway. The registered backward only scales that gradient by
the incoming one (in place when eager; per row for ``reduction="none"``: each row's loss depends
on its own logits only), so values and gradients are those of the functions and so is the cost,
plus the custom-operator dispatch (a few hundred microseconds a call in eager mode). The fused
linear operator precomputes its gradients only when one is needed and the reduction is
``"mean"`` or ``"sum"``; with ``"none"`` its backward recomputes the chunks (a backward operator),
one more chunked forward than the function's. Second derivatives are not supported (as for the
functions, whose gradients are ``once_differentiable``).

Example:
    >>> import torch
    >>> import encouraging_loss  # registers the operators
    >>> logits = torch.randn(8, 5, requires_grad=True)
    >>> target = torch.randint(0, 5, (8,))
    >>> loss = torch.ops.encouraging_loss.encouraging_loss(logits, target, label_smoothing=0.1)
    >>> loss.backward()
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from ..functional import encouraging_loss_with_options
from ..linear import linear_loss_with_options
from ..options import CROSS_ENTROPY_OPTIONS, LinearLossOptions, LossOptions, takes_options

__all__ = ["NAMESPACE", "encouraging_loss_op", "linear_encouraging_loss_op"]

#: The operators' namespace: ``torch.ops.encouraging_loss.<name>``.
NAMESPACE = "encouraging_loss"

_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


# Schema types of the options' annotations (``from __future__ import annotations``: strings).
_SCHEMA_TYPES = {"int": "int", "str": "str", "float": "float", "bool": "bool", "int | None": "int?",
                 "float | None": "float?", "torch.dtype | None": "ScalarType?"}  # fmt: skip


def _schema_default(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)  # None, True/False, ints and floats read the same in a schema


def _option_arguments(options_type: type[LossOptions], names=None, defaults=True) -> str:
    """Schema arguments for the fields ``names`` (default: all) of ``options_type``.

    The options are written once, in :mod:`..options`; every operator's schema and every
    unpacking of its arguments below follows the options class's field order.
    """
    fields = {f.name: f for f in dataclasses.fields(options_type) if f.init}
    arguments = []
    for name in names or fields:
        field = fields[name]
        argument = f"{_SCHEMA_TYPES[field.type]} {name}"
        arguments.append(argument + ("=" + _schema_default(field.default) if defaults else ""))
    return ", ".join(arguments)


# Read once here: torch.compile traces the public operators' bodies and the wrappers, and
# cannot trace dataclasses.fields of a class.
_DEFAULTS = {
    options_type: options_type.option_defaults()
    for options_type in (LossOptions, LinearLossOptions)
}


def _option_values(options_type: type[LossOptions], given: dict) -> tuple:
    """The options in field order, defaults where not ``given`` (the dispatcher leaves out an
    argument that equals its default)."""
    return tuple(given.get(name, default) for name, default in _DEFAULTS[options_type].items())


def _options_of(options_type: type[LossOptions], values, **changes) -> LossOptions:
    """The options object of an operator's option arguments (checked, cached per set)."""
    given = dict(zip(_DEFAULTS[options_type], values, strict=True))
    return options_type.of(**{**given, **changes})


def _keywords(options: LossOptions) -> dict:
    return {name: getattr(options, name) for name in _DEFAULTS[type(options)]}


#: Where ``reduction`` is among the option arguments.
_REDUCTION = {
    options_type: list(names).index("reduction") for options_type, names in _DEFAULTS.items()
}


def _custom_op(name: str, arguments: str, returns: str):
    """``torch.library.custom_op`` in this namespace with the schema ``(arguments) -> returns``
    (no keyword-only arguments: the kernels receive them in schema order)."""

    def register(function):
        return torch.library.custom_op(f"{NAMESPACE}::{name}", function, mutates_args=(),
                                       schema=f"({arguments}) -> {returns}")  # fmt: skip

    return register


def _loss_shape(input: Tensor, reduction: str) -> tuple:
    """The loss's shape: () for "mean"/"sum", else the input's without the class dimension."""
    if reduction != "none" or input.dim() < 2:
        return ()
    return (input.shape[0], *input.shape[2:])


def _in_layout_of(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` with the strides ``torch.empty_like(like)`` has (what the fake kernel says)."""
    target = torch.empty_like(like)
    return grad if grad.stride() == target.stride() else target.copy_(grad)


@contextlib.contextmanager
def _autograd_recording():
    """Autograd on inside an operator's kernel, where torch turned it off.

    A custom operator's kernel runs below the autograd dispatch keys (they are excluded), so
    torch operations record no graph even with grad mode on; only Python autograd Functions
    would. The kernels here compute their gradients with the library's autograd Functions and
    the torch operations around them: this guard lifts the exclusion (autocast stays off).
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


_AUTOGRAD_KEYS = (
    torch._C.DispatchKey.AutogradFunctionality,
    torch._C.DispatchKey.AutogradOther,
    torch._C.DispatchKey.AutogradNestedTensor,
)


def _unit_gradients(loss: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """The gradients of ``loss`` for a unit incoming gradient (each row's, for a row loss)."""
    return list(torch.autograd.grad(loss, leaves, torch.ones_like(loss)))


# --- encouraging_loss -------------------------------------------------------------------------


# (input, target, weight, bonus_weight, token_weight, the options in field order)
# -> (loss, unit gradient)
_ARGUMENTS = (
    "Tensor input, Tensor target, Tensor? weight, Tensor? bonus_weight, Tensor? token_weight, "
    + _option_arguments(LossOptions, defaults=False)
)


@_custom_op("encouraging_loss_and_grad", _ARGUMENTS, "(Tensor, Tensor)")
def _encouraging_loss_and_grad(input, target, weight, bonus_weight, token_weight,
                               *option_values):  # fmt: skip
    """(loss, d loss / d input for a unit incoming gradient) by :func:`encouraging_loss`."""
    options = _options_of(LossOptions, option_values)
    with _autograd_recording():
        leaf = input.detach().requires_grad_()
        loss = encouraging_loss_with_options(leaf, target, options, weight, bonus_weight,
                                             token_weight)  # fmt: skip
        (grad,) = _unit_gradients(loss, [leaf])
    return loss.detach().contiguous(), _in_layout_of(grad, input)


@_encouraging_loss_and_grad.register_fake
def _encouraging_loss_and_grad_fake(input, target, weight, bonus_weight, token_weight,
                                    *option_values):  # fmt: skip
    from .._validate import check_class_vector, check_input_and_target, check_token_weight

    # The checks that need no values run while tracing, so a compiled call fails where it is
    # written rather than when the graph runs.
    options = _options_of(LossOptions, option_values)
    check_input_and_target(input, target)
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    check_class_vector("weight", weight, num_classes, input)
    check_class_vector("bonus_weight", bonus_weight, num_classes, input)
    check_token_weight(token_weight, _loss_shape(input, "none"), input, validate_args=False)
    return input.new_empty(_loss_shape(input, options.reduction)), torch.empty_like(input)


def _keep_gradients(ctx, grads) -> None:
    """Keep the operator's unit gradients for backward, which scales them.

    Eagerly they are held on ``ctx`` (not saved), so the first backward scales them in place,
    as the library's Functions scale their buffers: no second gradient-sized tensor. A later
    backward through a retained graph finds none and recomputes them. While compiling they are
    saved as usual and scaled out of place (the compiler fuses that into what follows).
    """
    ctx.set_materialize_grads(False)  # no zeros for the gradients' own (unused) gradients
    ctx.mark_non_differentiable(*grads)
    ctx.eager = not torch.compiler.is_compiling() and all(type(g) is Tensor for g in grads)
    ctx.kept = list(grads) if ctx.eager else None
    ctx.num_kept = len(grads)


def _scale_gradient(ctx, grad: Tensor, grad_loss: Tensor) -> Tensor:
    grad_loss = grad_loss.to(grad.dtype)
    return grad.mul_(grad_loss) if ctx.eager else grad_loss * grad


def _encouraging_loss_setup(ctx, inputs, output):
    input, target, weight, bonus_weight, token_weight, *option_values = inputs
    _, grad = output
    _keep_gradients(ctx, [grad])
    ctx.num_inputs = len(inputs)
    if ctx.eager:
        ctx.save_for_backward(input, target, weight, bonus_weight, token_weight)
        ctx.option_values = option_values
    else:
        ctx.save_for_backward(grad)
    # "none" gives one loss per row of (N, C, d...): its incoming gradient broadcasts over C.
    reduction = option_values[_REDUCTION[LossOptions]]
    ctx.per_row = reduction == "none" and input.dim() > 1


def _encouraging_loss_backward(ctx, grad_loss, _grad_of_grad):
    nothing = [None] * (ctx.num_inputs - 1)
    if grad_loss is None:
        return (None, *nothing)
    if not ctx.eager:
        (grad,) = ctx.saved_tensors
    elif ctx.kept is not None:
        (grad,), ctx.kept = ctx.kept, None
    else:
        # A second backward through a retained graph: the first one scaled the gradient.
        _, grad = torch.ops.encouraging_loss.encouraging_loss_and_grad(
            *ctx.saved_tensors, *ctx.option_values
        )
    if ctx.per_row:
        grad_loss = grad_loss.unsqueeze(1)
    return (_scale_gradient(ctx, grad, grad_loss), *nothing)


_encouraging_loss_and_grad.register_autograd(
    _encouraging_loss_backward, setup_context=_encouraging_loss_setup
)

# torch.nn.functional.cross_entropy's arguments, then the bonus's (keyword-only).
_BONUS_OPTIONS = tuple(n for n in _DEFAULTS[LossOptions] if n not in CROSS_ENTROPY_OPTIONS)


def _encouraging_loss_public(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
    bonus_weight=None, token_weight=None, **options,
):  # fmt: skip
    """The public operator: the loss of :func:`_encouraging_loss_and_grad`."""
    given = dict(options, ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=label_smoothing)  # fmt: skip
    loss, _ = torch.ops.encouraging_loss.encouraging_loss_and_grad(
        input, target, weight, bonus_weight, token_weight, *_option_values(LossOptions, given)
    )
    return loss


_LIBRARY.define(
    f"encouraging_loss(Tensor input, Tensor target, Tensor? weight=None, "
    f"{_option_arguments(LossOptions, CROSS_ENTROPY_OPTIONS)}, *, Tensor? bonus_weight=None, "
    f"Tensor? token_weight=None, {_option_arguments(LossOptions, _BONUS_OPTIONS)}) -> Tensor"
)
_LIBRARY.impl("encouraging_loss", _encouraging_loss_public, "CompositeImplicitAutograd")


@takes_options(LossOptions)
def encouraging_loss_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    bonus_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
    **options,
) -> Tensor:
    """:func:`~encouraging_loss.encouraging_loss` through the custom operator
    ``torch.ops.encouraging_loss.encouraging_loss``: one node in compiled and exported graphs.

    Same arguments, result and gradient as :func:`~encouraging_loss.encouraging_loss` (see
    there). Use it where the loss should stay one operator: ``torch.export``, graphs that must
    keep the Triton kernels under ``torch.compile`` on CUDA, or the target-range check inside
    compiled code. Elsewhere :func:`~encouraging_loss.encouraging_loss` is the same loss (and
    under ``torch.compile`` it traces into the graph, which the compiler can fuse).

    Args:
        input: logits (C), (N, C) or (N, C, d1, ..., dK).
        target: class indices or class probabilities, as ``F.cross_entropy`` takes them.
        weight: optional (C,) class weights.
        ignore_index: class-index target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in [0, 1].
        bonus_weight: optional (C,) per-class bonus weights.
        token_weight: optional per-element weights of the target's index shape (see
            :func:`~encouraging_loss.encouraging_loss`).
        **options: the other options of :class:`~encouraging_loss.options.LossOptions`
            (``log_end``, ``bonus_scale``, ``bonus``, ``bonus_gamma``, ``bonus_start``,
            ``validate_args``, ``backend``).

    Returns:
        The loss: a scalar for ``"mean"``/``"sum"``, else the target's index shape.

    Raises:
        TypeError, ValueError: naming the argument that is wrong.

    Example:
        >>> import torch
        >>> from encouraging_loss import encouraging_loss_op
        >>> logits = torch.tensor([[4.0, 1.0, 0.0], [0.5, 2.0, 0.1]], requires_grad=True)
        >>> loss = encouraging_loss_op(logits, torch.tensor([0, 1]), log_end=0.75)
        >>> loss.backward()
        >>> round(loss.item(), 4)
        -1.5262
        >>> weighted = encouraging_loss_op(logits, torch.tensor([0, 1]),
        ...                                token_weight=torch.tensor([1.0, 0.0]))
        >>> round(weighted.item(), 4)  # the first element alone
        -2.0654
    """
    # Checked here too, so that an unknown option or a bad value is named before dispatch.
    options = LossOptions.of(ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, **options)  # fmt: skip
    return torch.ops.encouraging_loss.encouraging_loss(
        input, target, weight, bonus_weight=bonus_weight, token_weight=token_weight,
        **_keywords(options),
    )  # fmt: skip


# --- linear_encouraging_loss ------------------------------------------------------------------


def _linear_loss_and_gradients(
    hidden, weight, target, bias, class_weight, bonus_weight, token_weight, options, wanted,
    grad_loss=None,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """(loss, gradients of hidden, weight and bias) by :func:`linear_loss_with_options`, for
    the incoming ``grad_loss`` (None: a unit one); an empty tensor where not ``wanted``."""
    tensors = (hidden, weight, bias)
    with _autograd_recording():
        leaves = [None if t is None else t.detach().requires_grad_(want)
                  for t, want in zip(tensors, wanted, strict=True)]  # fmt: skip
        loss = linear_loss_with_options(leaves[0], leaves[1], target, leaves[2], options,
                                        class_weight, bonus_weight, token_weight)  # fmt: skip
        differentiated = [leaf for leaf, want in zip(leaves, wanted, strict=True) if want]
        if grad_loss is None:
            grads = _unit_gradients(loss, differentiated) if differentiated else []
        else:
            grads = list(torch.autograd.grad(loss, differentiated, grad_loss))
    grads.reverse()
    out = [_in_layout_of(grads.pop(), tensor) if want else hidden.new_empty(0)
           for tensor, want in zip(tensors, wanted, strict=True)]  # fmt: skip
    return loss.detach().contiguous(), out


def _linear_fake_checks(hidden, weight, target, bias, class_weight, bonus_weight, token_weight,
                        option_values):  # fmt: skip
    from .._validate import check_class_vector, check_token_weight
    from ..linear import check_linear_inputs

    _options_of(LinearLossOptions, option_values)
    check_linear_inputs(hidden, weight, target, bias)
    check_class_vector("class_weight", class_weight, weight.shape[0], hidden)
    check_class_vector("bonus_weight", bonus_weight, weight.shape[0], hidden)
    check_token_weight(token_weight, target.shape, hidden, validate_args=False)


def _fake_gradients(tensors, wanted) -> list[Tensor]:
    return [torch.empty_like(t) if want else tensors[0].new_empty(0)
            for t, want in zip(tensors, wanted, strict=True)]  # fmt: skip


# (hidden, weight, target, bias, class_weight, bonus_weight, token_weight, the options in field
# order, and which of the gradients of hidden, weight and bias to compute)
_LINEAR_ARGUMENTS = (
    "Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
    "Tensor? bonus_weight, Tensor? token_weight, "
    f"{_option_arguments(LinearLossOptions, defaults=False)}, "
    "bool grad_hidden, bool grad_weight, bool grad_bias"
)
#: The tensors of the fused linear operators' arguments, before the options.
_LINEAR_TENSORS = 7


@_custom_op("linear_encouraging_loss_and_grads", _LINEAR_ARGUMENTS,
            "(Tensor, Tensor, Tensor, Tensor)")  # fmt: skip
def _linear_loss_and_grads(hidden, weight, target, bias, class_weight, bonus_weight, token_weight,
                           *args):  # fmt: skip
    """(loss, and for a unit incoming gradient the gradients of hidden, weight and bias that
    ``grad_*`` ask for, each an empty tensor when not asked) by :func:`linear_encouraging_loss`.
    """
    *option_values, grad_hidden, grad_weight, grad_bias = args
    options = _options_of(LinearLossOptions, option_values)
    wanted = (grad_hidden, grad_weight, grad_bias and bias is not None)
    # LinearEL computes the loss and the unit gradients in one chunked pass.
    loss, grads = _linear_loss_and_gradients(hidden, weight, target, bias, class_weight,
                                             bonus_weight, token_weight, options,
                                             wanted)  # fmt: skip
    return (loss, *grads)


@_linear_loss_and_grads.register_fake
def _linear_loss_and_grads_fake(hidden, weight, target, bias, class_weight, bonus_weight,
                                token_weight, *args):  # fmt: skip
    *option_values, grad_hidden, grad_weight, grad_bias = args
    _linear_fake_checks(hidden, weight, target, bias, class_weight, bonus_weight, token_weight,
                        option_values)  # fmt: skip
    reduction = option_values[_REDUCTION[LinearLossOptions]]
    loss = hidden.new_empty(target.shape if reduction == "none" else ())
    wanted = (grad_hidden, grad_weight, grad_bias and bias is not None)
    return (loss, *_fake_gradients((hidden, weight, bias), wanted))


@_custom_op("linear_encouraging_loss_backward", f"Tensor grad_loss, {_LINEAR_ARGUMENTS}",
            "(Tensor, Tensor, Tensor)")  # fmt: skip
def _linear_loss_backward(grad_loss, hidden, weight, target, bias, class_weight, bonus_weight,
                          token_weight, *args):  # fmt: skip
    """The gradients of hidden, weight and bias for ``grad_loss`` (empty where not asked),
    recomputed chunk by chunk (the backward of ``reduction="none"``). It has no autograd
    formula of its own: a second derivative through it raises."""
    *option_values, grad_hidden, grad_weight, grad_bias = args
    options = _options_of(LinearLossOptions, option_values, validate_args=False)
    wanted = (grad_hidden, grad_weight, grad_bias and bias is not None)
    _, grads = _linear_loss_and_gradients(hidden, weight, target, bias, class_weight,
                                          bonus_weight, token_weight, options, wanted,
                                          grad_loss)  # fmt: skip
    return tuple(grads)


@_linear_loss_backward.register_fake
def _linear_loss_backward_fake(grad_loss, hidden, weight, target, bias, *args):
    *_, grad_hidden, grad_weight, grad_bias = args
    wanted = (grad_hidden, grad_weight, grad_bias and bias is not None)
    return tuple(_fake_gradients((hidden, weight, bias), wanted))


def _linear_setup(ctx, inputs, output):
    saved, rest = inputs[:_LINEAR_TENSORS], inputs[_LINEAR_TENSORS:]
    ctx.options_args = tuple(rest[:-3])
    ctx.precomputed = tuple(rest[-3:])
    _, *grads = output
    _keep_gradients(ctx, grads)
    ctx.save_for_backward(*saved, *([] if ctx.eager else grads))


def _linear_backward(ctx, grad_loss, *_grads_of_grads):
    # After hidden, weight, target and bias: the three weights, the options, the three flags.
    nothing = [None] * (_LINEAR_TENSORS - 4 + len(ctx.options_args) + 3)
    if grad_loss is None:
        return (None, None, None, None, *nothing)
    hidden, weight, target, bias, *weights = ctx.saved_tensors[:_LINEAR_TENSORS]
    grads = list(ctx.saved_tensors[_LINEAR_TENSORS:])
    if ctx.eager:
        grads, ctx.kept = ctx.kept, None
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[3])  # fmt: skip
    precomputed = all(p or not n for p, n in zip(ctx.precomputed, needs, strict=True))
    if grads is not None and precomputed:
        # "mean"/"sum": the gradients for a unit incoming gradient, scaled by the scalar one.
        scaled = [_scale_gradient(ctx, g, grad_loss) if n else None
                  for g, n in zip(grads, needs, strict=True)]  # fmt: skip
    else:
        # "none" (per-row incoming gradients), or a second backward: recompute chunk by chunk.
        scaled = torch.ops.encouraging_loss.linear_encouraging_loss_backward(
            grad_loss, hidden, weight, target, bias, *weights, *ctx.options_args, *needs,
        )  # fmt: skip
        scaled = [g if n else None for g, n in zip(scaled, needs, strict=True)]
    grad_hidden, grad_weight, grad_bias = scaled
    return (grad_hidden, grad_weight, None, grad_bias, *nothing)


_linear_loss_and_grads.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear_encouraging_loss_public(
    hidden, weight, target, bias=None, *, class_weight=None, bonus_weight=None, token_weight=None,
    **options,
):  # fmt: skip
    """The public operator: the loss of :func:`_linear_loss_and_grads`, which computes the
    gradients with it where they will be needed and the reduction allows."""
    values = _option_values(LinearLossOptions, options)
    reduction = values[_REDUCTION[LinearLossOptions]]
    precompute = torch.is_grad_enabled() and reduction != "none"
    wanted = [precompute and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, *_ = torch.ops.encouraging_loss.linear_encouraging_loss_and_grads(
        hidden, weight, target, bias, class_weight, bonus_weight, token_weight, *values, *wanted
    )
    return loss


_LIBRARY.define(
    "linear_encouraging_loss(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, *, "
    "Tensor? class_weight=None, Tensor? bonus_weight=None, Tensor? token_weight=None, "
    f"{_option_arguments(LinearLossOptions)}) -> Tensor"
)
_LIBRARY.impl(
    "linear_encouraging_loss", _linear_encouraging_loss_public, "CompositeImplicitAutograd"
)


@takes_options(LinearLossOptions)
def linear_encouraging_loss_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    bonus_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
    **options,
) -> Tensor:
    """:func:`~encouraging_loss.linear_encouraging_loss` through the custom operator
    ``torch.ops.encouraging_loss.linear_encouraging_loss``: one node in compiled graphs.

    Same arguments, result and gradients as :func:`~encouraging_loss.linear_encouraging_loss`
    (see there). ``"mean"`` and ``"sum"`` cost what the function costs; with
    ``reduction="none"`` the backward recomputes the loss's chunks once more than the function
    does (one more chunked forward pass).

    Args:
        hidden: (..., H) hidden states.
        weight: (C, H) projection.
        target: (...) class indices (``hidden``'s shape without H), or ``ignore_index``.
        bias: optional (C,) bias.
        class_weight: optional (C,) class weights.
        bonus_weight: optional (C,) per-class bonus weights.
        token_weight: optional per-token weights of the target's shape (see
            :func:`~encouraging_loss.linear_encouraging_loss`).
        **options: the options of :class:`~encouraging_loss.options.LinearLossOptions`.

    Returns:
        The loss in ``hidden``'s dtype: a scalar, or the target's shape for ``"none"``.

    Raises:
        TypeError, ValueError: naming the argument that is wrong.

    Example:
        >>> import torch
        >>> from encouraging_loss import linear_encouraging_loss, linear_encouraging_loss_op
        >>> hidden = torch.randn(6, 4, requires_grad=True)
        >>> projection = torch.randn(10, 4, requires_grad=True)
        >>> target = torch.tensor([1, 0, 9, -100, 3, 3])
        >>> loss = linear_encouraging_loss_op(hidden, projection, target, chunk_size=4)
        >>> loss.backward()
        >>> bool(torch.allclose(loss, linear_encouraging_loss(hidden, projection, target)))
        True
    """
    options = LinearLossOptions.of(**options)
    return torch.ops.encouraging_loss.linear_encouraging_loss(
        hidden, weight, target, bias, class_weight=class_weight, bonus_weight=bonus_weight,
        token_weight=token_weight, **_keywords(options),
    )  # fmt: skip
