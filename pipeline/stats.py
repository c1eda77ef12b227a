"""Seed-to-seed spread: the mean, standard deviation and count of one figure over a study's seeds.

``train.seeds`` trains every variant once per seed. The results files and the report give each
figure as mean ± std over those runs, with n, and call a difference between two variants that is
smaller than the spread between seeds what it is: noise, not a finding.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """One figure over n runs that differ only in their seed.

    Attributes:
        mean: The mean over the runs.
        std: The sample standard deviation (n - 1 in the denominator); None for a single run,
            whose noise is unknown.
        n: How many runs had the figure.
    """

    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 2) -> str:
        """``45.20 ± 1.31 (n=3)``; just ``45.20`` for a single run."""
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def spread(values: Iterable[float | None]) -> Spread | None:
    """The spread of the values that are numbers (None and NaN left out); None if there are none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None
    std = statistics.stdev(kept) if len(kept) > 1 else None
    return Spread(statistics.fmean(kept), std, len(kept))


def seed_noise(a: Spread, b: Spread) -> float | None:
    """The between-seed spread two figures are compared against: the larger of their standard
    deviations (None when neither was measured over more than one seed)."""
    stds = [s.std for s in (a, b) if s.std is not None]
    return max(stds) if stds else None


def within_noise(a: Spread, b: Spread) -> bool:
    """Whether the difference of the means is smaller than the spread between seeds.

    Such a difference is not evidence that one is better: another draw of seeds could reverse it.
    Unknown (False) when neither figure was measured over more than one seed.
    """
    noise = seed_noise(a, b)
    return noise is not None and abs(a.mean - b.mean) < noise


def noise_neighbours(figures: Mapping[str, Spread]) -> dict[str, list[tuple[str, float, float]]]:
    """For each name, the others whose figure differs from its own by less than the seed noise.

    Returns:
        name -> ``[(other, |difference|, noise), ...]`` in the input's order; a name with no such
        neighbour (or no spread measured) maps to an empty list.
    """
    out: dict[str, list[tuple[str, float, float]]] = {}
    for name, a in figures.items():
        out[name] = []
        for other, b in figures.items():
            if other != name and within_noise(a, b):
                out[name].append((other, abs(a.mean - b.mean), seed_noise(a, b) or 0.0))
    return out
