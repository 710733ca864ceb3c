"""Strict reading of parsed TOML tables: typed getters, dotted key names, unknown keys.

A :class:`Table` wraps one table of a ``tomllib`` document. Its getters check type and
range and raise :class:`ailfmd.errors.ConfigError` naming the source, the dotted key
(``thermal.layers[2].die_thickness_m``) and the bad value. It remembers which keys were
asked for, so :meth:`Table.finish` can reject the rest: a typo never falls back silently
to a default.

Files of different kinds word a few messages differently; a :class:`Style`, given once
to the top table and inherited by every sub-table, selects that wording.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NoReturn

from ailfmd.errors import ConfigError

REQUIRED: Any = object()
"""Default meaning "the key must be present"."""

RangeWording = Literal["plain", "between", "span", "implausible"]


@dataclass(frozen=True)
class Style:
    """How a family of files words its errors; the defaults are the plainest choice.

    ``int_range``/``num_range``: ``plain`` says ``must be >= 1`` or ``must be <= 9``;
    ``between``: ``must be between 1 and 9``; ``span``: ``must be at least 1 and at most
    9`` (``above`` if open); ``implausible``: like plain with ``:g`` numbers and
    ``(implausible)`` after an upper bound.
    """

    int_range: RangeWording = "plain"
    num_range: RangeWording = "plain"
    number_reason: str = "must be a finite number"  # for a value that is no number
    nonfinite_reason: str = "must be a finite number"
    allow_inf: bool = False  # True: infinities only meet the range check
    float_first: bool = False  # True: numbers are converted before checks (errors show 5.0)
    non_empty_strings: bool = False
    itemwise_lists: bool = False  # True: lists non-empty, items checked as ``key[i]``
    missing_hint: bool = False  # suggest an unused key that looks like a missing one
    unknown_hint: bool = False  # "unknown section; did you mean 'daemon.mode'?"
    choice_hint: bool = False  # quoted choices and a "did you mean" for a bad one
    absent_table_empty: bool = False  # a missing sub-table reads as an empty one


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is no number


class Table:
    """One TOML table being validated; sub-tables share its source and style."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = "",
                 style: Style = Style()) -> None:
        self.data, self.source, self.prefix, self.style = data, source, prefix, style
        self._used: list[str] = []
        self._children: list[Table] = []

    def dotted(self, key: str) -> str:
        """The full name of ``key``: ``prefix.key`` (``key[i]`` works too)."""
        return f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)

    def fail(self, key: str, value: object, reason: str) -> NoReturn:
        raise ConfigError(self.source, self.dotted(key), value, reason)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> Iterator[str]:
        return iter(list(self.data))

    def is_integer(self, key: str) -> bool:
        return _is_int(self.data.get(key))

    def _get(self, key: str, default: Any) -> Any:
        self._used.append(key)
        if key in self.data:
            return self.data[key]
        if default is not REQUIRED:
            return default
        hint = ""
        if self.style.missing_hint:
            near = difflib.get_close_matches(key, [k for k in self.data if k not in self._used], 1)
            hint = f" (is {self.dotted(near[0])!r} a misspelling of it?)" if near else ""
        self.fail(key, None, "missing required key" + hint)

    def finish(self) -> None:
        """Reject the first key nobody asked for. With ``unknown_hint`` the reason
        suggests the nearest known key, sub-tables' keys included (``mode`` written
        above ``[daemon]`` suggests ``daemon.mode``)."""
        candidates = {k: self.dotted(k) for k in self._used}
        for child in self._children:
            for k in child._used:
                candidates.setdefault(k, child.dotted(k))
        for key, value in self.data.items():
            if key in self._used:
                continue
            if not self.style.unknown_hint:
                self.fail(key, value, "unknown key")
            near = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
            hint = (f"did you mean {candidates[near[0]]!r}?" if near
                    else "known: " + ", ".join(self.dotted(k) for k in self._used))
            self.fail(key, value, f"unknown {'section' if isinstance(value, dict) else 'key'}; {hint}")

    # ---------------------------------------------------------------- tables

    def _child(self, key: str, value: dict[str, Any]) -> Table:
        child = Table(value, self.source, self.dotted(key), self.style)
        self._children.append(child)
        return child

    def table(self, key: str) -> Table:
        """A required sub-table (an empty one if absent, with ``absent_table_empty``)."""
        value = self._get(key, {} if self.style.absent_table_empty else REQUIRED)
        if not isinstance(value, dict):
            where = f" ([{self.dotted(key)}])" if self.style.absent_table_empty else ""
            self.fail(key, value, "must be a table" + where)
        return self._child(key, value)

    def optional_table(self, key: str) -> Table | None:
        return None if key not in self.data else self.table(key)

    def table_list(self, key: str) -> list[Table]:
        """An array of tables; ``[[key]]`` entries are named ``key[i]``."""
        if self.style.itemwise_lists:
            values = self._list(key, REQUIRED, "")
            for i, v in enumerate(values):
                if not isinstance(v, dict):
                    self.fail(f"{key}[{i}]", v, "must be a table")
        else:
            values = self._get(key, REQUIRED)
            if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
                self.fail(key, values, "must be an array of tables ([[...]])")
        return [self._child(f"{key}[{i}]", v) for i, v in enumerate(values)]

    # ---------------------------------------------------------------- scalars

    def string(self, key: str, *, default: Any = REQUIRED) -> str:
        value = self._get(key, default)
        if self.style.non_empty_strings:
            if not isinstance(value, str) or not value.strip():
                self.fail(key, value, "must be a non-empty string")
        elif not isinstance(value, str):
            self.fail(key, value, "must be a string")
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: Any = REQUIRED) -> str:
        value = self._get(key, default)
        shown = ", ".join(map(repr, choices) if self.style.choice_hint else choices)
        if not isinstance(value, str):
            self.fail(key, value, f"must be a string, one of {shown}" if self.style.choice_hint
                      else "must be a string")
        if value not in choices:
            hint = ""
            if self.style.choice_hint:
                near = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
                hint = f"; did you mean {near[0]!r}?" if near else ""
            self.fail(key, value, f"must be one of {shown}{hint}")
        return value

    def matching(self, key: str, pattern: re.Pattern[str], what: str, *,
                 default: Any = REQUIRED) -> str:
        """A string matching ``pattern``; ``what`` describes it in the error."""
        value = self.string(key, default=default)
        if not pattern.match(value):
            self.fail(key, value, f"must be {what}")
        return value

    def path(self, key: str, *, default: Any = REQUIRED) -> Path:
        """An absolute path: a relative one would depend on the working directory."""
        value = self._get(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, str) or not value:
            self.fail(key, value, "must be a path (a non-empty string)")
        if "\0" in value:
            self.fail(key, value, "must not contain a NUL character")
        if not value.startswith("/"):
            self.fail(key, value, "must be an absolute path")
        return Path(value)

    def boolean(self, key: str, *, default: Any = REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "must be true or false")
        return value

    def integer(self, key: str, lo: int | None = None, hi: int | None = None, *,
                default: Any = REQUIRED) -> Any:
        """An integer in ``[lo, hi]``; an absent key gives ``default`` unchecked."""
        value = self._get(key, default)
        return value if key not in self.data else self._integer(key, value, lo, hi)

    def number(self, key: str, lo: float | None = None, hi: float | None = None, *,
               default: Any = REQUIRED, lo_open: bool = False) -> float:
        """A float (integers accepted) in ``[lo, hi]``, or ``(lo, hi]`` with ``lo_open``."""
        value = self._get(key, default)
        return value if key not in self.data else self._number(key, value, lo, hi, lo_open)

    def _integer(self, key: str, value: Any, lo: int | None, hi: int | None) -> int:
        if not _is_int(value):
            self.fail(key, value, "must be an integer")
        self._check_range(key, value, lo, hi, False, self.style.int_range)
        return value

    def _number(self, key: str, value: Any, lo: float | None, hi: float | None,
                lo_open: bool) -> float:
        st = self.style
        if not (_is_int(value) or isinstance(value, float)):
            self.fail(key, value, st.number_reason)
        if st.float_first:
            value = float(value)
        if math.isnan(value) or (math.isinf(value) and not st.allow_inf):
            self.fail(key, value, st.nonfinite_reason)
        self._check_range(key, value, lo, hi, lo_open, st.num_range)
        return float(value)

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None,
                     lo_open: bool, wording: RangeWording) -> None:
        """Fail unless ``lo <= value <= hi`` (``lo < value`` if open); None: no bound."""
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if not (too_low or too_high):
            return
        op = ">" if lo_open else ">="
        if wording == "between":
            reason = f"must be between {lo} and {hi}"
        elif wording == "span":
            reason = f"must be {'above' if lo_open else 'at least'} {lo} and at most {hi}"
        elif wording == "implausible":
            reason = f"must be {op} {lo:g}" if too_low else f"must be <= {hi:g} (implausible)"
        else:
            reason = f"must be {op} {lo}" if too_low else f"must be <= {hi}"
        self.fail(key, value, reason)

    # ---------------------------------------------------------------- lists

    def _list(self, key: str, default: Any, what: str) -> list[Any]:
        values = self._get(key, default)
        if not isinstance(values, list) or (self.style.itemwise_lists and not values):
            self.fail(key, values, "must be a non-empty list" if self.style.itemwise_lists
                      else f"must be a list{what}")
        return values

    def items(self, key: str, *, default: Any = REQUIRED) -> list[Any]:
        """A list of anything; the caller checks the items."""
        return self._list(key, default, " ([...])")

    def integer_list(self, key: str, lo: int, hi: int) -> list[int]:
        if self.style.itemwise_lists:
            values = self._list(key, REQUIRED, "")
            return [self._integer(f"{key}[{i}]", v, lo, hi) for i, v in enumerate(values)]
        values = self._get(key, REQUIRED)
        if not isinstance(values, list) or not values:
            self.fail(key, values, "must be a non-empty list of integers")
        if not all(_is_int(v) and lo <= v <= hi for v in values):
            self.fail(key, values, f"every value must be an integer in [{lo}, {hi}]")
        return values

    def number_list(self, key: str, lo: float, hi: float | None = None, *,
                    default: Any = REQUIRED) -> list[float]:
        values = self._list(key, default, " of numbers")
        if self.style.itemwise_lists:
            return [self._number(f"{key}[{i}]", v, lo, hi, False) for i, v in enumerate(values)]
        for v in values:  # `not v >= lo` also rejects NaN
            if not (_is_int(v) or isinstance(v, float)) or not v >= lo or (hi is not None and v > hi):
                bound = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
                self.fail(key, values, f"every value must be a number {bound}")
        return [float(v) for v in values]
