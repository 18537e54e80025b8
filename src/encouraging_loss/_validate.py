"""Argument checks shared by every loss, so that each error message is written once.

Checks that read tensor *values* (target ranges) force a host-device sync; they are skipped when
the caller passes ``validate_args=False`` and while ``torch.compile`` traces the function.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

REDUCTIONS = ("mean", "sum", "none")


def value_checks_enabled(validate_args: bool) -> bool:
    """Whether checks that read tensor values (and so synchronise the device) should run."""
    if not isinstance(validate_args, bool):
        raise TypeError(f"validate_args must be a bool, got {type(validate_args).__name__}")
    return validate_args and not torch.compiler.is_compiling()


def check_tensor(name: str, value, *, floating: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number inside the given interval; returns it as a float.

    While ``torch.compile`` traces, a module's float attribute may arrive as a symbolic float: it
    was checked when the module was built, and is passed through.
    """
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A bool (not merely truthy); returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_class_vector(name: str, value, num_classes: int, like: torch.Tensor):
    """An optional per-class vector of shape (C,) on the input's device."""
    if value is None:
        return None
    check_tensor(name, value, floating=True)
    if value.dim() != 1 or value.numel() != num_classes:
        raise ValueError(
            f"{name} must be a 1-D tensor with one entry per class (shape ({num_classes},)), "
            f"got shape {tuple(value.shape)}"
        )
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but input is on {like.device}")
    return value


def check_token_weight(token_weight, index_shape, like: torch.Tensor, validate_args: bool):
    """Optional per-element weights of the target's index shape (the input's shape without the
    class dimension), on the input's device: a floating tensor, not requiring grad (a constant,
    as the class weight is). With ``validate_args`` (and not while compiling) the values are
    read too, and so synchronise the device: every weight must be finite and >= 0.
    """
    if token_weight is None:
        return None
    if not isinstance(token_weight, torch.Tensor):
        raise TypeError(f"token_weight must be a torch.Tensor, got {type(token_weight).__name__}")
    expected = tuple(index_shape)
    if not token_weight.is_floating_point():
        raise TypeError(
            f"token_weight must be a floating-point tensor of shape {expected} (the target's "
            f"index shape), got dtype {token_weight.dtype}"
        )
    if tuple(token_weight.shape) != expected:
        raise ValueError(
            f"token_weight must have the target's index shape {expected} (the input's shape "
            f"without the class dimension), got shape {tuple(token_weight.shape)}"
        )
    if token_weight.device != like.device:
        raise ValueError(f"token_weight is on {token_weight.device} but input is on {like.device}")
    if token_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "token_weight must not require grad (it is a constant weight, as the class weight "
            "is); pass token_weight.detach()"
        )
    if value_checks_enabled(validate_args) and token_weight.numel() > 0:
        # One reduction and one read (NaN propagates into both bounds).
        low, high = torch.aminmax(token_weight)
        if not bool((low >= 0) & (high < math.inf)):
            bad = ~(torch.isfinite(token_weight) & (token_weight >= 0))
            value = float(token_weight[bad].flatten()[0])
            raise ValueError(
                f"token_weight must hold finite values >= 0 (one weight per element of the "
                f"target's index shape), got {value}"
            )
    return token_weight


def check_input_and_target(input: torch.Tensor, target: torch.Tensor) -> bool:
    """Check the shapes of a cross-entropy style (input, target) pair.

    Returns:
        True for class-index targets, False for class-probability targets.
    """
    check_tensor("input", input, floating=True)
    check_tensor("target", target)
    if input.dim() == 0:
        raise ValueError("input must have shape (C), (N, C) or (N, C, d1, ..., dK), got a scalar")
    if input.shape[1 if input.dim() > 1 else 0] == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    index_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                "probability targets must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        return False
    if target.dtype in (torch.bool, torch.complex64, torch.complex128) or target.is_complex():
        raise TypeError(
            f"target must hold class indices (an integer dtype) or class probabilities "
            f"(a floating dtype), got {target.dtype}"
        )
    if target.shape != index_shape:
        raise ValueError(
            f"class-index targets for input of shape {tuple(input.shape)} must have shape "
            f"{tuple(index_shape)}, got {tuple(target.shape)}"
        )
    return True


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every class index lies in [0, C) or equals ignore_index (reads values: syncs the device)."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target holds class index {value}, outside [0, {num_classes - 1}] "
            f"(and not ignore_index={ignore_index})"
        )
