"""What a setting may be: small rules, checked before any work, that fail with one line.

Every field of :class:`~riftlab.engine.config.RiftConfig` has a rule in
:data:`riftlab.engine.config.RULES` (one line each), and the command line adds rules for its own
options (``--out``, ``--checkpoint``, ``--autoattack``...). A value a rule refuses raises
:class:`SettingError`: the setting's name, the value given and what is allowed, on one line::

    width must be an integer >= 1, got 0
    at_lr must be a finite number > 0, got nan
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["SettingError", "Rule", "Integer", "Number", "OneOf", "Text", "Flag", "Pattern", "Items", "Custom"]


class SettingError(ValueError):
    """A setting was given a value it may not have. ``name``, ``value``, ``allowed`` (in words) and an optional
    ``detail`` (why, when the rule knows more) make the one-line message."""

    def __init__(self, name: str, value: Any, allowed: str, detail: str = ""):
        self.name, self.value, self.allowed, self.detail = name, value, allowed, detail
        super().__init__(f"{name} must be {allowed}, got {_shown(value)}" + (f" ({detail})" if detail else ""))

    def renamed(self, name: str) -> "SettingError":
        """The same error under another name (the command line names its option, ``--lr``, not the field ``at_lr``)."""
        return SettingError(name, self.value, self.allowed, self.detail)


def _shown(value: Any) -> str:
    text = repr(str(value)) if hasattr(value, "__fspath__") else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True, kw_only=True)
class Rule:
    """A rule for one setting. ``optional``: ``None`` is allowed too (the default is worked out later). ``words``
    replaces the generated description of what is allowed; ``note`` is added after it in parentheses."""

    optional: bool = False
    words: str = ""
    note: str = ""

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`SettingError` unless ``value`` is allowed for the setting ``name``."""
        if value is None and self.optional:
            return
        detail = self.problem(value) if value is not None else ""
        if value is None or detail is not None:
            raise SettingError(name, value, self.allowed, detail or "")

    @property
    def allowed(self) -> str:
        """What the rule allows, in words ("an integer >= 1")."""
        return (self.words or self.describe()) + (f" ({self.note})" if self.note else "")

    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` (not ``None``) is allowed, else why not ("" when the description says it all)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    text = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {text(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {text(high)}"
    return ""


def _inside(x: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (x > low if low_open else x >= low)
    below = high is None or (x < high if high_open else x <= high)
    return above and below


@dataclass(frozen=True, kw_only=True)
class Integer(Rule):
    """A whole number (never a bool or a float) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None

    def problem(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and _inside(value, self.low, self.high, False, False)
        return None if ok else ""

    def describe(self) -> str:
        return " ".join(filter(None, ["an integer", _bounds(self.low, self.high, False, False)]))


@dataclass(frozen=True, kw_only=True)
class Number(Rule):
    """A finite number (an int or a float, never a bool, NaN or an infinity) between ``low`` and ``high``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and _inside(value, self.low, self.high, self.low_open, self.high_open))
        return None if ok else ""

    def describe(self) -> str:
        bounds = _bounds(self.low, self.high, self.low_open, self.high_open)
        return f"a number {bounds}" if self.low is not None and self.high is not None else f"a finite number {bounds}".rstrip()


@dataclass(frozen=True, kw_only=True)
class OneOf(Rule):
    """One of ``choices`` (a sequence, or a function returning one, for registries that grow at run time)."""

    choices: Sequence[str] | Callable[[], Sequence[str]] = ()

    def names(self) -> list[str]:
        return list(self.choices() if callable(self.choices) else self.choices)

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, str) and value in self.names() else ""

    def describe(self) -> str:
        return "one of " + ", ".join(self.names())


@dataclass(frozen=True, kw_only=True)
class Text(Rule):
    """A non-empty string (a name or a path)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, str) and value.strip() else ""

    def describe(self) -> str:
        return "a non-empty text"


@dataclass(frozen=True, kw_only=True)
class Flag(Rule):
    """True or False."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else ""

    def describe(self) -> str:
        return "True or False"


@dataclass(frozen=True, kw_only=True)
class Pattern(Rule):
    """A string matching the regular expression ``regex`` in full; ``words`` says what that is."""

    regex: str = ""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, str) and re.fullmatch(self.regex, value) else ""

    def describe(self) -> str:
        return f"text matching {self.regex}"


@dataclass(frozen=True, kw_only=True)
class Items(Rule):
    """A tuple of values that each pass ``item``: ``length`` of them (any number >= ``min_length`` when None),
    strictly ``increasing`` if asked, and holding ``include`` when that is set."""

    item: Rule = Integer()
    length: int | None = None
    min_length: int = 0
    increasing: bool = False
    include: Any = None

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, tuple):
            return ""
        ok = (len(value) == self.length if self.length is not None else len(value) >= self.min_length)
        ok = ok and all(self.item.problem(v) is None for v in value if v is not None) and None not in value
        ok = ok and (not self.increasing or all(a < b for a, b in zip(value, value[1:])))
        ok = ok and (self.include is None or self.include in value)
        return None if ok else ""

    def describe(self) -> str:
        count = f"{self.length}" if self.length is not None else "a tuple of"
        parts = [f"{count} values, each {self.item.allowed}"]
        if self.increasing:
            parts.append("increasing")
        if self.include is not None:
            parts.append(f"including {self.include!r}")
        return ", ".join(parts)


@dataclass(frozen=True, kw_only=True)
class Custom(Rule):
    """A rule given as a function: ``test(value)`` returns ``None`` when the value is allowed, else why not ("" if
    ``words`` says it all)."""

    test: Callable[[Any], str | None] = lambda value: None

    def problem(self, value: Any) -> str | None:
        return self.test(value)

    def describe(self) -> str:
        return "a valid value"
