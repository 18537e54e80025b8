"""Loss names to typed loss specs, and specs to configured criteria.

Grammar: ``FAMILY[:ARGS]`` where ``ARGS`` is a comma-separated list of ``key=value`` pairs and at
most one leading bare value for the family's main parameter. Examples::

    ce                      torch.nn.CrossEntropyLoss()
    ls-ce:0.1               CrossEntropyLoss(label_smoothing=0.1)
    el                      EncouragingLoss(log_end=0.75)
    el:log_end=1            EncouragingLoss(log_end=1.0)
    ls-el:0.1               EncouragingLoss(label_smoothing=0.1)
    el:log_end=0.5,bonus_scale=0.5
    el:bonus=power,bonus_gamma=2
    el:ramp=0.5,start=0.1   bonus scale scheduled: BonusSchedule(final=bonus_scale, start, ramp,
                            shape) — the bonus is off until ``start``, then ramps in
    el:log_end=0.75,log_end_from=0.5,log_end_ramp=1
                            log_end scheduled from 0.5 to 0.75 over training
    el:bonus_start=0.5      bonus only where p_y > 0.5
    el:bonus_weight=balanced  class-balanced bonus weights (tasks that know class counts)
    focal:gamma=2           FocalLoss(gamma=2)
    poly1:epsilon=1         Poly1Loss(epsilon=1)

A name is parsed once into a :class:`LossSpec`; the runner stores each spec (and its CE
baseline) in the results, so the report never parses names again. Values are checked by the
core's own constructors when the spec is parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from encouraging_loss import BonusSchedule, EncouragingLoss, FocalLoss, Poly1Loss


class UnknownLossError(ValueError):
    """A loss name or one of its parameters is not understood."""


@dataclass(frozen=True)
class Family:
    """One loss family of the grammar.

    Attributes:
        name: the family's name (``el``, ``ce`` ...).
        main: the parameter a bare value sets (``ls-ce:0.1``), or ``None``.
        params: parameter names and their types.
        defaults: values of parameters not given.
        build: ``build(spec, class_counts)`` returns the criterion; ``None`` for a family whose
            task builds it.
    """

    name: str
    main: str | None
    params: dict[str, type]
    defaults: dict[str, object] = field(default_factory=dict)
    build: Callable[[LossSpec, list[int] | None], nn.Module] | None = None

    def with_name(self, name: str, **defaults) -> Family:
        """A copy under another name (``ls-ce`` is ``ce`` with label smoothing 0.1)."""
        return replace(self, name=name, defaults={**self.defaults, **defaults})


@dataclass(frozen=True)
class LossSpec:
    """A parsed loss name.

    Attributes:
        name: the name as the user wrote it (the label in results).
        family: the family's name.
        params: parsed parameters (those given, plus the family's defaults).
    """

    name: str
    family: str
    params: dict[str, object] = field(default_factory=dict)

    @property
    def baseline_name(self) -> str:
        """The CE counterpart this loss is compared with (label smoothing matched)."""
        smoothing = self.params.get("label_smoothing", 0.0)
        return f"ls-ce:{smoothing:g}" if smoothing else "ce"

    def to_dict(self) -> dict:
        """The spec as JSON (stored in ``results.json``)."""
        return {"family": self.family, "params": dict(self.params)}


# --- criteria --------------------------------------------------------------------------------
EL_OPTIONS = ("log_end", "bonus_scale", "bonus", "bonus_gamma", "bonus_start", "label_smoothing")
SCHEDULES = {
    # option -> (its schedule's parameters: start, ramp, shape, initial value or None)
    "bonus_scale": ("start", "ramp", "shape", None),
    "log_end": ("log_end_start", "log_end_ramp", "log_end_shape", "log_end_from"),
}
BONUS_WEIGHTS = ("none", "balanced")


def class_balanced_weights(counts: list[int], beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced ``(C,)`` float32 weights (Cui et al. 2019): ``(1 - beta) / (1 - beta^n_c)``,
    scaled to mean 1.

    Args:
        counts: per-class training counts (all positive).
        beta: in ``[0, 1)``; 0 gives equal weights.

    Raises:
        ValueError: for an empty or non-positive count, or ``beta`` outside ``[0, 1)``.
    """
    if not counts or min(counts) < 1:
        raise ValueError(f"counts: expected positive per-class counts, got {counts}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta: must be in [0, 1), got {beta}")
    n = torch.tensor(counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - beta**n)
    return (weights / weights.mean()).float()


def _schedule_or_value(p: dict, option: str, default: float):
    """``p[option]``, or a :class:`BonusSchedule` to it when the spec schedules it.

    A scheduled bonus scale starts at 0 (the bonus is off until ``start``); a scheduled
    ``log_end`` starts at ``log_end_from``.
    """
    start, ramp, shape, initial = SCHEDULES[option]
    final = float(p.get(option, default))
    keys = (start, ramp, shape) if initial is None else (start, ramp, shape, initial)
    if not any(key in p for key in keys):
        return final
    return BonusSchedule(
        final=final,
        start=float(p.get(start, 0.0)),
        ramp=float(p.get(ramp, 0.0)),
        shape=str(p.get(shape, "linear")),
        initial=0.0 if initial is None else float(p.get(initial, final)),
    )


def _build_el(spec: LossSpec, class_counts: list[int] | None) -> nn.Module:
    p = spec.params
    kwargs = {k: p[k] for k in EL_OPTIONS if k in p}
    kwargs["bonus_scale"] = _schedule_or_value(p, "bonus_scale", 1.0)
    if any(key in p for key in SCHEDULES["log_end"]):
        kwargs["log_end"] = _schedule_or_value(p, "log_end", 0.75)
    bonus_weight = str(p.get("bonus_weight", "none"))
    if bonus_weight not in BONUS_WEIGHTS:
        raise UnknownLossError(
            f"loss {spec.name!r}: bonus_weight must be one of {', '.join(BONUS_WEIGHTS)}, "
            f"got {bonus_weight!r}"
        )
    if bonus_weight == "balanced":
        if class_counts is None:
            raise UnknownLossError(
                f"loss {spec.name!r}: bonus_weight=balanced needs class counts; only tasks "
                "with imbalanced classes (imbalanced) support it"
            )
        kwargs["bonus_weight"] = class_balanced_weights(class_counts)
    return EncouragingLoss(**kwargs)


def _build_ce(spec: LossSpec, class_counts: list[int] | None) -> nn.Module:
    smoothing = float(spec.params.get("label_smoothing", 0.0))
    # The core's own check of label_smoothing (torch's module checks only when called).
    EncouragingLoss(label_smoothing=smoothing, bonus_scale=0.0)
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


_EL_PARAMS: dict[str, type] = {
    **{k: float for k in EL_OPTIONS},
    "bonus": str,
    "bonus_weight": str,
    **{k: float for k in ("start", "ramp", "log_end_start", "log_end_ramp", "log_end_from")},
    "shape": str,
    "log_end_shape": str,
}
_EL = Family("el", "log_end", _EL_PARAMS, build=_build_el)
_CE = Family("ce", "label_smoothing", {"label_smoothing": float}, build=_build_ce)
FAMILIES: dict[str, Family] = {
    "ce": _CE,
    "ls-ce": _CE.with_name("ls-ce", label_smoothing=0.1),
    "el": _EL,
    "ls-el": replace(_EL, name="ls-el", main="label_smoothing", defaults={"label_smoothing": 0.1}),
    "focal": Family(
        "focal", "gamma", {"gamma": float}, {"gamma": 2.0}, lambda s, _: FocalLoss(**s.params)
    ),
    "poly1": Family(
        "poly1",
        "epsilon",
        {"epsilon": float, "label_smoothing": float},
        {"epsilon": 1.0},
        lambda s, _: Poly1Loss(**s.params),
    ),
}
LOSS_FAMILIES = tuple(FAMILIES)


def build_criterion(
    spec: LossSpec | str,
    class_counts: list[int] | None = None,
    families: dict[str, Family] | None = None,
) -> nn.Module:
    """Build the configured criterion of a loss.

    Args:
        spec: a :class:`LossSpec` or a loss name.
        class_counts: per-class training counts, for options that need them
            (``bonus_weight=balanced``); ``None`` where the task has none.
        families: the families to build from (default :data:`FAMILIES`; a task passes its own).

    Returns:
        An ``nn.Module`` called as ``criterion(logits, targets)`` with mean reduction; an
        ``EncouragingLoss`` with a schedule follows it through ``criterion.step(progress)``.

    Raises:
        UnknownLossError: for a name that does not parse, or a family without a builder.
    """
    families = FAMILIES if families is None else families
    if isinstance(spec, str):
        spec = parse_loss(spec, families)
    if not isinstance(spec, LossSpec):
        raise UnknownLossError(f"spec: expected LossSpec or str, got {type(spec).__name__}")
    family = families.get(spec.family)
    if family is None or family.build is None:
        raise UnknownLossError(f"spec: no criterion builder for family {spec.family!r}")
    return family.build(spec, class_counts)


# --- parsing ---------------------------------------------------------------------------------
def _parse_items(name: str, family: Family, items: list[str]) -> dict[str, object]:
    params: dict[str, object] = dict(family.defaults)
    for position, item in enumerate(items):
        key, has_eq, raw = item.partition("=")
        if not has_eq:
            if position != 0 or family.main is None:
                raise UnknownLossError(
                    f"loss {name!r}: bare value {item!r} must come first (it sets {family.main})"
                )
            key, raw = family.main, item
        key = key.strip()
        kind = family.params.get(key)
        if kind is None:
            raise UnknownLossError(
                f"loss {name!r}: unknown parameter {key!r} for {family.name}; "
                f"known: {', '.join(family.params)}"
            )
        try:
            params[key] = kind(raw.strip())
        except ValueError:
            raise UnknownLossError(
                f"loss {name!r}: parameter {key}={raw!r} is not a valid {kind.__name__}"
            ) from None
    return params


def _spec(head: str, items: list[str], families: dict[str, Family], probe: list[int]) -> LossSpec:
    """The spec of one loss from its family head and parameter items, checked by the core."""
    family_part, _, first = (part.strip() for part in head.partition(":"))
    family_name, name = family_part.lower(), ",".join([head, *items])
    if family_name not in families:
        raise UnknownLossError(
            f"unknown loss {name!r}; known families: {', '.join(families)} "
            "(e.g. ce, el, el:log_end=1, ls-ce:0.1, ls-el:0.1, focal:gamma=2, poly1:epsilon=1)"
        )
    family = families[family_name]
    params = _parse_items(name, family, ([first] if first else []) + items)
    spec = LossSpec(name, family_name, params)
    if family.build is not None:
        try:  # the core's constructors check every value
            family.build(spec, probe)
        except UnknownLossError:
            raise
        except (ValueError, TypeError) as error:
            raise UnknownLossError(f"loss {name!r}: {error}") from None
    return spec


def parse_loss(name: str, families: dict[str, Family] | None = None) -> LossSpec:
    """Parse one loss name (see the module docstring for the grammar) into a :class:`LossSpec`.

    Args:
        name: e.g. ``"el:log_end=1"``.
        families: the families known (default :data:`FAMILIES`).

    Raises:
        UnknownLossError: for an unknown family, parameter, or an invalid value.
    """
    specs = parse_loss_list(name, families)
    if len(specs) != 1:
        raise UnknownLossError(f"name: expected one loss, got {len(specs)} in {name!r}")
    return specs[0]


def parse_loss_list(text: str, families: dict[str, Family] | None = None) -> list[LossSpec]:
    """Parse a ``--losses`` value: names separated by ``,`` where a known family starts a loss.

    Commas also separate a loss's parameters (``el:log_end=0.5,bonus_scale=0.5``): an item that
    does not start with a family name is a parameter of the loss before it.

    Args:
        text: e.g. ``"ce,el,el:log_end=0.5,bonus_scale=0.5,ls-ce:0.1"``.
        families: the families known (default :data:`FAMILIES`; tasks add their own).

    Returns:
        The parsed specs, in order, without duplicates.

    Raises:
        UnknownLossError: if the list is empty or an item is not a loss.
    """
    families = FAMILIES if families is None else families
    if not isinstance(text, str) or not text.strip():
        raise UnknownLossError(f"losses: expected a comma-separated list, got {text!r}")
    groups: list[tuple[str, list[str]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        starts_loss = item.partition(":")[0].strip().lower() in families
        if groups and not starts_loss and (":" in groups[-1][0] or groups[-1][1]):
            groups[-1][1].append(item)
        else:
            groups.append((item, []))
    probe = [2, 1]  # class counts, so that options needing them can be checked at parse time
    specs: list[LossSpec] = []
    for head, items in groups:
        spec = _spec(head, items, families, probe)
        if spec.name not in {s.name for s in specs}:
            specs.append(spec)
    if not specs:
        raise UnknownLossError(f"losses: no loss names in {text!r}")
    return specs


def baselines(specs: list[LossSpec]) -> dict[str, str | None]:
    """Each loss's CE counterpart among ``specs`` (label smoothing matched), or ``None``.

    CE-family losses (``ce``, ``ls-ce``) have none; they are the baselines.
    """
    ce_like = {s.baseline_name: s.name for s in specs if s.family in ("ce", "ls-ce")}
    return {
        s.name: None if s.family in ("ce", "ls-ce") else ce_like.get(s.baseline_name) for s in specs
    }
