"""Loss names to configured criteria.

Grammar: ``FAMILY[:ARGS]`` where ``ARGS`` is a comma-separated list of ``key=value`` pairs and at
most one leading bare value for the family's main parameter. Examples::

    ce                      torch.nn.CrossEntropyLoss()
    ls-ce:0.1               CrossEntropyLoss(label_smoothing=0.1)
    el                      EncouragingLoss(log_end=0.75)
    el:log_end=1            EncouragingLoss(log_end=1.0)
    ls-el:0.1               EncouragingLoss(label_smoothing=0.1)
    el:log_end=0.5,bonus_scale=0.5
    el:ramp=0.5,start=0.1   bonus scale scheduled by BonusSchedule(final=bonus_scale, ...)
    el:bonus_start=0.5      bonus only where p_y > 0.5
    focal:gamma=2           FocalLoss(gamma=2)
    poly1:epsilon=1         Poly1Loss(epsilon=1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from encouraging_loss import BonusSchedule, EncouragingLoss, FocalLoss, Poly1Loss


class UnknownLossError(ValueError):
    """A loss name or one of its parameters is not understood."""


# family -> (main parameter for a bare value, {parameter: type}, defaults)
_FAMILIES: dict[str, tuple[str, dict[str, type], dict[str, object]]] = {
    "ce": ("label_smoothing", {"label_smoothing": float}, {}),
    "ls-ce": ("label_smoothing", {"label_smoothing": float}, {"label_smoothing": 0.1}),
    "el": (
        "log_end",
        {
            "log_end": float,
            "bonus_scale": float,
            "bonus": str,
            "bonus_start": float,
            "label_smoothing": float,
            "start": float,
            "ramp": float,
            "shape": str,
        },
        {},
    ),
    "ls-el": (
        "label_smoothing",
        {
            "label_smoothing": float,
            "log_end": float,
            "bonus_scale": float,
            "bonus": str,
            "bonus_start": float,
            "start": float,
            "ramp": float,
            "shape": str,
        },
        {"label_smoothing": 0.1},
    ),
    "focal": ("gamma", {"gamma": float}, {}),
    "poly1": ("epsilon", {"epsilon": float, "label_smoothing": float}, {}),
}
LOSS_FAMILIES = tuple(_FAMILIES)
_SCHEDULE_KEYS = ("start", "ramp", "shape")


@dataclass(frozen=True)
class LossSpec:
    """A parsed loss name.

    Attributes:
        name: the name as the user wrote it (used as the label in results).
        family: ``ce``, ``ls-ce``, ``el``, ``ls-el``, ``focal`` or ``poly1``.
        params: parsed parameters (only those given, plus the family's defaults).
    """

    name: str
    family: str
    params: dict[str, object] = field(default_factory=dict)

    @property
    def is_encouraging(self) -> bool:
        """Whether this is an encouraging-loss variant."""
        return self.family in ("el", "ls-el")

    @property
    def baseline_name(self) -> str:
        """The CE counterpart this loss is compared with (label smoothing matched)."""
        smoothing = self.params.get("label_smoothing", 0.0)
        return f"ls-ce:{_format_value(smoothing)}" if smoothing else "ce"

    @property
    def has_schedule(self) -> bool:
        """Whether the bonus scale follows a :class:`BonusSchedule` over training."""
        return any(key in self.params for key in _SCHEDULE_KEYS)


def _format_value(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 1 else f"{value:g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_loss(name: str, extra_families: dict | None = None) -> LossSpec:
    """Parse one loss name.

    Args:
        name: e.g. ``"el:log_end=1"``; see the module docstring for the grammar.
        extra_families: task-specific families added to (or replacing) the built-in ones, in
            the same ``{family: (main parameter, {parameter: type}, defaults)}`` layout; the
            task that adds them also builds their criteria.

    Returns:
        The parsed :class:`LossSpec`.

    Raises:
        UnknownLossError: for an unknown family, parameter, or a malformed value.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnknownLossError(f"name: expected a non-empty loss name, got {name!r}")
    name = name.strip()
    family, _, arg_text = name.partition(":")
    family = family.strip().lower()
    families = {**_FAMILIES, **(extra_families or {})}
    if family not in families:
        raise UnknownLossError(
            f"unknown loss {name!r}; known families: {', '.join(families)} "
            "(e.g. ce, el, el:log_end=1, ls-ce:0.1, ls-el:0.1, focal:gamma=2, poly1:epsilon=1)"
        )
    main_param, types, defaults = families[family]
    params: dict[str, object] = dict(defaults)
    if arg_text.strip():
        for position, item in enumerate(arg_text.split(",")):
            item = item.strip()
            key, has_eq, raw = item.partition("=")
            if not has_eq:
                if position != 0:
                    raise UnknownLossError(
                        f"loss {name!r}: bare value {item!r} must come first (it sets {main_param})"
                    )
                key, raw = main_param, item
            key = key.strip()
            if key not in types:
                raise UnknownLossError(
                    f"loss {name!r}: unknown parameter {key!r} for {family}; "
                    f"known: {', '.join(types)}"
                )
            try:
                params[key] = types[key](raw.strip())
            except ValueError:
                raise UnknownLossError(
                    f"loss {name!r}: parameter {key}={raw!r} is not a valid {types[key].__name__}"
                ) from None
    smoothing = params.get("label_smoothing", 0.0)
    if not 0.0 <= float(smoothing) < 1.0:  # type: ignore[arg-type]
        raise UnknownLossError(f"loss {name!r}: label_smoothing must be in [0, 1), got {smoothing}")
    return LossSpec(name=name, family=family, params=params)


def parse_loss_list(text: str, extra_families: dict | None = None) -> list[LossSpec]:
    """Parse a ``--losses`` value: names separated by ``,`` where a new name starts a family.

    Commas also separate a loss's parameters (``el:log_end=0.5,bonus_scale=0.5``), so an item
    containing ``=`` or a number after a loss with parameters is kept with that loss.

    Args:
        text: e.g. ``"ce,el,el:log_end=0.5,bonus_scale=0.5,ls-ce:0.1"``.
        extra_families: task-specific families, as in :func:`parse_loss`.

    Returns:
        The parsed specs, in order, without duplicates.

    Raises:
        UnknownLossError: if the list is empty or an item is not a loss.
    """
    if not isinstance(text, str) or not text.strip():
        raise UnknownLossError(f"losses: expected a comma-separated list, got {text!r}")
    groups: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        head = item.partition(":")[0].strip().lower()
        known = head in _FAMILIES or head in (extra_families or {})
        continues_previous = groups and ":" in groups[-1] and not known
        if continues_previous:
            groups[-1] += "," + item
        else:
            groups.append(item)
    specs: list[LossSpec] = []
    for group in groups:
        spec = parse_loss(group, extra_families)
        if spec.name not in {s.name for s in specs}:
            specs.append(spec)
    if not specs:
        raise UnknownLossError(f"losses: no loss names in {text!r}")
    return specs


def build_criterion(spec: LossSpec | str) -> nn.Module:
    """Build the configured criterion for a loss name.

    Args:
        spec: a :class:`LossSpec` or a loss name.

    Returns:
        An ``nn.Module`` called as ``criterion(logits, targets)`` with mean reduction.

    Raises:
        UnknownLossError: if ``spec`` is a string that does not parse.
    """
    if isinstance(spec, str):
        spec = parse_loss(spec)
    if not isinstance(spec, LossSpec):
        raise UnknownLossError(f"spec: expected LossSpec or str, got {type(spec).__name__}")
    p = spec.params
    if spec.family in ("ce", "ls-ce"):
        return nn.CrossEntropyLoss(label_smoothing=float(p.get("label_smoothing", 0.0)))
    if spec.family in ("el", "ls-el"):
        kwargs = {
            key: p[key]
            for key in ("log_end", "bonus_scale", "bonus", "bonus_start", "label_smoothing")
            if key in p
        }
        return EncouragingLoss(**kwargs)
    if spec.family == "focal":
        return FocalLoss(gamma=float(p.get("gamma", 2.0)))
    return Poly1Loss(
        epsilon=float(p.get("epsilon", 1.0)), label_smoothing=float(p.get("label_smoothing", 0.0))
    )


def build_bonus_schedule(spec: LossSpec) -> BonusSchedule | None:
    """Return the bonus-scale schedule a loss asks for, or ``None`` for a constant scale.

    Args:
        spec: a parsed encouraging-loss name with ``start``, ``ramp`` or ``shape`` parameters.

    Returns:
        ``BonusSchedule(final=bonus_scale, start, ramp, shape)`` or ``None``.

    Raises:
        UnknownLossError: if ``spec`` is not a :class:`LossSpec`.
    """
    if not isinstance(spec, LossSpec):
        raise UnknownLossError(f"spec: expected LossSpec, got {type(spec).__name__}")
    if not (spec.is_encouraging and spec.has_schedule):
        return None
    p = spec.params
    return BonusSchedule(
        final=float(p.get("bonus_scale", 1.0)),
        start=float(p.get("start", 0.0)),
        ramp=float(p.get("ramp", 0.0)),
        shape=str(p.get("shape", "linear")),
    )
