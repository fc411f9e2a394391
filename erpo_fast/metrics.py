"""One reducer for named metrics: weighted means, totals and maxima, merged across parts and ranks.

Why: a mean of means is wrong when the parts differ in size, and a mean turned back into a sum needs its count
carried beside it. So a mean is kept as (sum of value x weight, sum of weights) until the very end: parts
(micro-batches, mini-batches, ranks) merge by adding, and the finished value is the exact mean of the whole,
however it was split. Names are the metric keys as logged.
"""

from __future__ import annotations

from collections.abc import Mapping

from erpo_fast.distributed import all_gather_objects


class Metrics:
    """Named metrics of one step (or one part of it): means, totals and maxima; see the module docstring."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}  # means and totals
        self._weights: dict[str, float] = {}  # the names that are means: their summed weights
        self._maxes: dict[str, float] = {}

    def mean(self, name: str, value: float, weight: float = 1.0) -> None:
        """Add ``value`` to the weighted mean ``name`` (a part of ``weight`` tokens, sequences, updates ...)."""
        self._sums[name] = self._sums.get(name, 0.0) + float(value) * weight
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def total(self, name: str, value: float) -> None:
        """Add ``value`` to the total ``name`` (ints stay ints)."""
        self._sums[name] = self._sums.get(name, 0) + value

    def max(self, name: str, value: float) -> None:
        self._maxes[name] = max(self._maxes.get(name, float(value)), float(value))

    def add(self, values: Mapping[str, float], weight: float = 1.0) -> None:
        """Each of ``values``: a maximum when its name ends in ``_max``, else a mean with ``weight``."""
        for name, value in values.items():
            if name.endswith("_max"):
                self.max(name, value)
            else:
                self.mean(name, value, weight)

    def update(self, other: Metrics) -> Metrics:
        """Merge ``other`` (another part of the same metrics) into these; returns self."""
        for name, value in other._sums.items():
            self._sums[name] = self._sums.get(name, 0) + value
        for name, weight in other._weights.items():
            self._weights[name] = self._weights.get(name, 0.0) + weight
        for name, value in other._maxes.items():
            self.max(name, value)
        return self

    def all_reduce(self) -> Metrics:
        """Every rank's metrics merged into new ones, in rank order (so every rank gets the same values), with one
        collective over the default process group; a copy without one. Ranks may hold different names (a rank
        with nothing to measure adds none). Collective: every rank must call it."""
        out = Metrics()
        for sums, weights, maxes in all_gather_objects((self._sums, self._weights, self._maxes)):
            part = Metrics()
            part._sums, part._weights, part._maxes = sums, weights, maxes
            out.update(part)
        return out

    def result(self) -> dict[str, float]:
        """The finished values by name: means (a mean with zero weight has none and is left out), totals, maxima."""
        out: dict[str, float] = {}
        for name, value in self._sums.items():
            if name not in self._weights:
                out[name] = value
            elif self._weights[name] > 0:
                out[name] = value / self._weights[name]
        out.update(self._maxes)
        return out
