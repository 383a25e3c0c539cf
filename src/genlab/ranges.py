"""Valid ranges of config values, declared on the fields: ``steps: PositiveInt = 2000``.

:func:`genlab.config.from_dict` checks every value against its field's range when a config is
built, before any file is written. Fields without a declared range still get the rules that hold
for nearly every number in a config: an ``int`` is a count, size or step (``>= 0``), and a
``float`` is finite (no nan / inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Range:
    """``lo <= x <= hi`` (``<`` where open); None leaves a side unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def describe(self) -> str:
        """The range in words for error messages: '>= 1', '> 0', 'in [0, 1)'."""
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "finite"


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x:g}" if x is not None else ""


NON_NEGATIVE = Range(0)  # the implicit range of an int field
FINITE = Range()  # the implicit range of a float field

PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
PositiveFloat = Annotated[float, Range(0, lo_open=True)]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
UnitFloat = Annotated[float, Range(0, 1)]  # a probability, a mixing weight, a decay
