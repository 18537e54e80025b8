"""The loss options: one frozen object, validated once, shared by every form of the loss.

:func:`encouraging_loss`, :class:`EncouragingLoss`, the fused linear loss and the Triton kernels
all read their settings from a :class:`LossOptions` (the fused linear loss from its subclass
:class:`LinearLossOptions`). The option names, defaults and checks are written here only: the
public functions and modules take them as ``**options`` (their signatures list them, see
:func:`takes_options`), a module builds its object once in ``__init__``, and each call then checks
only what depends on the tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field

import torch

from ._validate import check_choice, check_int, check_real, check_reduction
from .bonus import Bonus

__all__ = [
    "BACKENDS",
    "CROSS_ENTROPY_OPTIONS",
    "LinearLossOptions",
    "LossOptions",
    "option_attributes",
    "takes_options",
]

BACKENDS = ("auto", "torch", "triton")
#: The options that are also ``F.cross_entropy``'s arguments (positional in its order).
CROSS_ENTROPY_OPTIONS = ("ignore_index", "reduction", "label_smoothing")


@dataclass(frozen=True)
class LossOptions:
    """The options of the encouraging loss, checked when the object is built.

    Args:
        ignore_index: class-index target value that contributes nothing (index targets only).
        reduction: ``"mean"`` (weighted mean over non-ignored items, as torch), ``"sum"`` or
            ``"none"``.
        label_smoothing: in [0, 1]; applied to the cross-entropy and the bonus alike.
        log_end: where the conservative log bonus turns linear, in (0, 1]. The paper recommends
            0.75 for tasks that reach high accuracy, 0.5 otherwise; 1 gives the plain log bonus.
        bonus_scale: rho, the weight of the bonus (0 gives cross-entropy).
        bonus: the bonus shape, ``"log"``, ``"power"`` (-p**bonus_gamma), ``"cosine"``
            (cos(pi p) - 1) or ``"none"`` (see :mod:`encouraging_loss.bonus`).
        bonus_gamma: exponent of the power bonus, > 0.
        bonus_start: in [0, 1): no bonus for p < bonus_start (shifted to stay continuous).
        validate_args: check that class indices are in range. On a GPU this reads the target's
            values and so synchronises; pass ``False`` on a hot path. Shape checks always run.
        backend: ``"auto"`` (the Triton kernels for CUDA tensors when ``triton`` imports and
            they support the options, else torch), ``"torch"`` or ``"triton"`` (always the
            kernels; an error names what they do not support).
        z_loss: a float >= 0: adds ``z_loss * lse**2`` per element (PaLM's z-loss,
            Liger-Kernel's ``lse_square_scale``), lse the logsumexp of the element's
            (softcapped) logits. It is multiplied by the token weight, not by the class weight,
            and is zero for ignored elements; "mean" divides it by the loss's own denominator.
        softcap: None or a float c > 0: the logits z become ``c * tanh(z / c)`` before the loss
            (and the z-loss), as in Gemma 2; the gradient goes through the tanh exactly.

    Example:
        >>> from encouraging_loss.options import LossOptions
        >>> options = LossOptions(label_smoothing=0.1)
        >>> options.replace(bonus_scale=0.5).bonus_scale
        0.5
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    log_end: float = 0.75
    bonus_scale: float = 1.0
    bonus: str = "log"
    bonus_gamma: float = 1.0
    bonus_start: float = 0.0
    validate_args: bool = True
    backend: str = "auto"
    z_loss: float = 0.0
    softcap: float | None = None
    #: The validated :class:`Bonus` of ``bonus``, ``log_end``, ``bonus_gamma``, ``bonus_start``.
    bonus_shape: Bonus = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_int("ignore_index", self.ignore_index)
        check_reduction(self.reduction)
        self._set("label_smoothing", check_real("label_smoothing", self.label_smoothing, low=0.0,
                                                high=1.0))  # fmt: skip
        self._set("bonus_scale", check_real("bonus_scale", self.bonus_scale))
        if not isinstance(self.validate_args, bool):
            raise TypeError(
                f"validate_args must be a bool, got {type(self.validate_args).__name__}"
            )
        check_choice("backend", self.backend, BACKENDS)
        self._set("z_loss", check_real("z_loss", self.z_loss, low=0.0))
        if self.softcap is not None:
            self._set("softcap", check_real("softcap", self.softcap, low=0.0, low_open=True))
        shape = Bonus(self.bonus, self.log_end, self.bonus_gamma, self.bonus_start)
        self._set("log_end", shape.log_end)
        self._set("bonus_gamma", shape.gamma)
        self._set("bonus_start", shape.start)
        self._set("bonus_shape", shape)

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    @functools.cached_property
    def derived(self) -> dict:
        """What the loss paths derive from these options, by path (a plan built on a path's
        first call with this object, so that later calls check only their tensors). Not an
        option: a copy made by :meth:`replace` starts empty."""
        return {}

    @property
    def with_logit_terms(self) -> bool:
        """Whether the z-loss or the softcap is set (they are applied around the loss)."""
        return self.z_loss != 0.0 or self.softcap is not None

    def without_logit_terms(self) -> LossOptions:
        """These options with no z-loss and no softcap: those of the loss of the capped logits
        (built once per options object)."""
        if not self.with_logit_terms:
            return self
        if torch.compiler.is_compiling():
            return self.replace(z_loss=0.0, softcap=None)
        return _without_logit_terms(self)

    @property
    def with_bonus(self) -> bool:
        """Whether the bonus contributes (a shape other than ``"none"`` and a nonzero scale)."""
        return not (self.bonus_shape.is_zero or self.bonus_scale == 0.0)

    def replace(self, **changes) -> LossOptions:
        """A copy with some options changed, checked as a new object is."""
        return dataclasses.replace(self, **changes)

    def smoothing_masses(self, num_classes: int) -> tuple[float, float]:
        """(alpha, beta): with label smoothing eps, the target distribution of a class-index
        target y is ``alpha + beta [k = y]``, alpha = eps / C, beta = 1 - eps (as torch's)."""
        epsilon = self.label_smoothing
        return epsilon / num_classes, 1.0 - epsilon

    @classmethod
    def of(cls, **options) -> LossOptions:
        """``cls(**options)``, built once per distinct set of options (for per-call use).

        Raises:
            TypeError, ValueError: naming the argument, as the constructor does.
        """
        if torch.compiler.is_compiling():
            return cls(**options)
        try:
            return _cached(cls, **options)
        except TypeError:
            # An unhashable value: the constructor names the argument it rejects.
            return cls(**options)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of the options, in the constructor's order."""
        return tuple(cls.option_defaults())

    @classmethod
    def option_defaults(cls) -> dict:
        """The options' defaults by name, in the constructor's order."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


@functools.lru_cache(maxsize=256, typed=True)
def _cached(cls, **options):
    return cls(**options)


@functools.lru_cache(maxsize=64)
def _without_logit_terms(options: LossOptions) -> LossOptions:
    return options.replace(z_loss=0.0, softcap=None)


@dataclass(frozen=True)
class LinearLossOptions(LossOptions):
    """:class:`LossOptions` plus the fused linear loss's own two.

    Args:
        chunk_size: rows per chunk, a positive int; ``None`` picks
            ``next_power_of_2(ceil(N / ceil(C / H)))`` (chunk logits about the size of
            ``hidden``).
        accumulation_dtype: the dtype the ``weight`` and ``bias`` gradients are summed in over
            chunks: ``None`` (float32; float64 for float64 inputs), ``weight.dtype`` or a wider
            float (see :func:`encouraging_loss.linear_encouraging_loss`).
    """

    chunk_size: int | None = None
    accumulation_dtype: torch.dtype | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size is not None and check_int("chunk_size", self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size}")
        if self.accumulation_dtype is not None and not isinstance(
            self.accumulation_dtype, torch.dtype
        ):
            raise TypeError(
                f"accumulation_dtype must be None or a torch.dtype, got {self.accumulation_dtype!r}"
            )


def takes_options(options_type: type[LossOptions]):
    """Decorator: show the options of ``options_type`` in the signature of a ``**options``
    function, as keyword-only parameters with their defaults (``help()``, ``inspect``).

    Options the function names as parameters of its own (``ignore_index`` and the other
    arguments of ``F.cross_entropy``) stay where they are.

    Args:
        options_type: the options class whose fields the ``**options`` take.
    """
    defaults = options_type.option_defaults()

    def decorate(function):
        signature = inspect.signature(function)
        kept = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        named = {p.name for p in kept}
        keywords = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
            for name, default in defaults.items()
            if name not in named
        ]
        function.__signature__ = signature.replace(parameters=[*kept, *keywords])
        return function

    return decorate


def option_attributes(options_type: type[LossOptions]):
    """Class decorator: each option of ``options_type`` becomes an attribute of the module.

    Reading ``module.bonus_scale`` reads ``module.options.bonus_scale``; setting it replaces
    ``module.options`` by a checked copy (so a bad value fails where it is set, and calls check
    nothing).

    Args:
        options_type: the options class the module keeps as ``self.options``.
    """

    def option(name: str) -> property:
        def get(self):
            return getattr(self.options, name)

        def set_(self, value):
            self.options = self.options.replace(**{name: value})

        return property(get, set_, doc=f"``options.{name}`` (setting it checks the new value).")

    def decorate(cls):
        for name in options_type.option_names():
            setattr(cls, name, option(name))
        return cls

    return decorate
