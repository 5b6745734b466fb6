"""What a profile says each table's ids are worth, and how much of that a CAFE plan serves with rows of their own.

Importance is normalised per feature to mean 1 per occurrence (as CAFE scores it), so an id's
value is its share of its table's occurrences times the table's occurrences per sample (all
features are assumed sampled over the same samples). Per table the sampled counts give a
decreasing value curve v_t(k) of the k-th most frequent id; ids not seen in the sample share the
Good-Turing unseen mass (singletons / sample size), spread over the remaining rows as a power
law fitted to the sampled rank-frequency slope, so the curve stays continuous. A CAFE group's
shared hot pool of H rows serves the group's H most valuable ids across its tables; each
table's hashed rows then serve its next ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.layout import CafePlan


@dataclass
class ValueCurve:
    """Decreasing value of a table's k-th most valuable id: sampled head, power-law tail."""

    rows: int
    head: np.ndarray  # values of the seen ids, descending
    tail_coef: float  # tail value at rank k (k > len(head)): tail_coef * k^-tail_exp
    tail_exp: float
    total: float  # value of all the table's ids

    def count_at_least(self, tau: float) -> float:
        """How many ids are worth at least tau (fractional in the tail)."""
        if tau <= 0:
            return float(self.rows)
        d = len(self.head)
        seen = int(np.searchsorted(-self.head, -tau, side="right"))
        if self.tail_coef <= 0 or d >= self.rows:
            return float(min(seen, self.rows))
        try:
            k = (self.tail_coef / tau) ** (1.0 / self.tail_exp)  # tail ranks d+1..k are worth >= tau
        except OverflowError:  # a flat tail (exponent near 0) at a tiny tau: beyond every row
            k = float(self.rows)
        return float(min(seen + max(0.0, min(k, self.rows) - d), self.rows))

    def mass_of_top(self, k: float) -> float:
        """Value covered by the k most valuable ids."""
        d = len(self.head)
        k = max(0.0, min(k, float(self.rows)))
        if k <= d:
            whole = int(k)
            return float(self._head_cum[whole - 1] if whole else 0.0) + (k - whole) * (
                self.head[whole] if whole < d else 0.0
            )
        return float(self._head_cum[-1] if d else 0.0) + self._tail_mass(d, k)

    def _tail_mass(self, a: float, b: float) -> float:
        s, c = self.tail_exp, self.tail_coef
        if c <= 0 or b <= a:
            return 0.0
        lo, hi = a + 0.5, b + 0.5  # midpoint rule for sum_{k=a+1}^{b} c k^-s
        return c * (math.log(hi / lo) if abs(s - 1) < 1e-9 else (hi ** (1 - s) - lo ** (1 - s)) / (1 - s))

    def __post_init__(self) -> None:
        self._head_cum = np.cumsum(self.head) if len(self.head) else np.zeros(0)


def value_curves(tables: Sequence[EmbeddingBagConfig], profile: Mapping[str, torch.Tensor]) -> Dict[str, ValueCurve]:
    """Each table's value curve from the profile's sampled ids (module docstring); an unsampled
    table's ids are all worth the same."""
    sizes = {f: int(torch.as_tensor(ids).numel()) for f, ids in profile.items()}
    known = [n for n in sizes.values() if n > 0]
    per_feature = float(np.mean(known)) if known else 1.0
    curves = {}
    for t in tables:
        pieces = [torch.as_tensor(profile[f]).reshape(-1).to(torch.int64) for f in t.feature_names if f in profile]
        ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        n = ids.numel()
        mass = n / per_feature if n else float(len(t.feature_names))  # occurrences per sample, relative
        rows = t.num_embeddings
        if n == 0:  # nothing known: every id equally valuable
            curves[t.name] = ValueCurve(rows, np.zeros(0), mass / rows, 1e-6, mass)
            continue
        counts = (
            torch.unique(torch.remainder(ids, rows), return_counts=True)[1]
            .sort(descending=True)
            .values.double()
            .numpy()
        )
        d = len(counts)
        unseen_rows = rows - d
        singletons = float((counts == 1).sum())
        unseen = min(singletons / n, 0.5) if unseen_rows > 0 else 0.0
        head = _smooth(counts) / n * (1.0 - unseen) * mass
        tail_exp = _fit_exponent(counts)
        tail_coef = 0.0
        if unseen > 0:
            probe = ValueCurve(rows, np.zeros(d), 1.0, tail_exp, 0.0)
            z = probe._tail_mass(d, rows)
            tail_coef = unseen * mass / z if z > 0 else 0.0
        curves[t.name] = ValueCurve(rows, head, tail_coef, tail_exp, mass)
    return curves


def _smooth(counts: np.ndarray) -> np.ndarray:
    """Descending counts with ties spread evenly over [c - 1/2, c + 1/2): a run of ids seen
    equally often (thousands of singletons) then fills row by row instead of all at once, so
    the allocation is continuous in the price."""
    values = counts.astype(np.float64)
    if len(values) == 0:
        return values
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    sizes = np.diff(np.r_[starts, len(values)])
    position = np.arange(len(values)) - np.repeat(starts, sizes)
    return values + 0.5 - (position + 0.5) / np.repeat(sizes, sizes)


def _fit_exponent(counts: np.ndarray) -> float:
    """Zipf exponent from the reliable part (count >= 3) of a rank-frequency list; 1.0 if too short."""
    m = int((counts >= 3).sum())
    if m < 5:
        return 1.0
    ranks = np.log(np.arange(1, m + 1))
    slope = np.polyfit(ranks, np.log(counts[:m]), 1)[0]
    return float(min(max(-slope, 0.05), 3.0))


def coverage_of(plan: CafePlan, curves: Mapping[str, ValueCurve]) -> Dict[str, float]:
    """Estimated share of each table's importance mass served by its own row: plain tables all;
    a group's hot rows serve its most valuable ids across tables, then each table's hashed rows
    its next ones."""
    out = {p.config.name: 1.0 for p in plan.plain}
    for g in plan.groups:
        members = [curves[t.name] for t in g.tables]
        hot = _hot_split(members, g.hot_rows)
        for t, c, h in zip(g.tables, members, hot):
            out[t.name] = c.mass_of_top(h + t.hashed_rows) / c.total if c.total > 0 else 0.0
    return out


def top_value(curves: Sequence[ValueCurve]) -> float:
    """The most valuable id's value over `curves` (at least 1e-300): where a threshold search starts."""
    return max(
        max((c.head[0] if len(c.head) else c.tail_coef * (len(c.head) + 1) ** -c.tail_exp) for c in curves), 1e-300
    )


def _hot_split(curves: Sequence[ValueCurve], hot_rows: float) -> List[float]:
    """How many of the group's hot rows each table's ids take: the hot_rows most valuable ids."""
    if hot_rows <= 0:
        return [0.0] * len(curves)
    if hot_rows >= sum(c.rows for c in curves):
        return [float(c.rows) for c in curves]
    lo, hi = math.log(top_value(curves)) - 80.0, math.log(top_value(curves))  # count(e^lo) >= hot_rows
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sum(c.count_at_least(math.exp(mid)) for c in curves) >= hot_rows:
            lo = mid
        else:
            hi = mid
    counts = [c.count_at_least(math.exp(lo)) for c in curves]
    scale = hot_rows / sum(counts) if sum(counts) > 0 else 0.0
    return [n * scale for n in counts]
