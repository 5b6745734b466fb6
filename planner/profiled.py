"""The profiled split: rows go where skew buys the most importance mass (value curves: value_curves.py).

Given a price lambda per byte, table t wants the ids worth covering, r_t = #{k : v_t(k) >=
lambda x bytes per row_t} (greedy marginal allocation: with concave coverage curves, taking
rows in order of value per byte is optimal for the relaxation). A CAFE group's shared hot pool
of H rows serves the group's H most valuable ids across its tables (h_t of them from table t),
so table t gets x_t = r_t - h_t hashed rows, and H is what the group's hot share funds from
those hashed rows (H = hot_share / (1 - hot_share) x hashed bytes / bytes per hot row, solved
by bisection). A table that wants nearly all its ids stays plain. lambda is bisected until the
plan fills the tightest rank. No table is compressed more than ``spread`` (default 10) times
harder than the uniform ratio, so every table keeps a usable hashed region. The per-table
ratios are set so that layout.size_group gives exactly x_t hashed rows, with the group's hot
share and threshold fixed to the uniform solution's (the paper's defaults for the overall ratio).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_planner.estimators import optimizer_state_bytes
from cafe_planner.placement import Assignment
from cafe_planner.problem import BudgetProblem, bisect_log
from cafe_planner.value_curves import ValueCurve, top_value
from cafe_torchrec.config import CafeConfig, default_hot_share, default_threshold
from cafe_torchrec.layout import BYTES_PER_VALUE, CafePlan, hot_row_bytes

Solution = Tuple[Dict[str, CafeConfig], CafePlan, Assignment]


def _hot_and_hashed(
    curves: Sequence[ValueCurve], want: Sequence[float], floor: Sequence[float], kappa: float
) -> List[float]:
    """Hashed rows per table when the group's hot pool H holds its most valuable ids and is
    funded by the hashed rows: H = kappa * sum_t max(floor_t, want_t - hot_t(H)). Bisection on
    the hot pool's value threshold (the pool grows as the threshold falls)."""
    top = top_value(curves)
    lo, hi = math.log(top) - 80.0, math.log(top) + 1.0

    def hashed_at(log_tau: float) -> Tuple[float, List[float]]:
        tau = math.exp(log_tau)
        hot = [c.count_at_least(tau) for c in curves]
        return sum(hot), [max(f, w - h) for w, f, h in zip(want, floor, hot)]

    for _ in range(50):
        mid = 0.5 * (lo + hi)
        pool, hashed = hashed_at(mid)
        if pool > kappa * sum(hashed):
            lo = mid  # pool too big for what the hashed rows fund: raise the threshold
        else:
            hi = mid
    return hashed_at(hi)[1]


def solve_profiled(
    problem: BudgetProblem, ratio_u: float, curves: Mapping[str, ValueCurve], spread: float
) -> Optional[Solution]:
    """Bisect the price per byte until the profiled allocation fills the tightest rank of
    `problem` (ratio_u: its uniform solution's ratio; curves: value_curves of its tables)."""
    tables, base = problem.tables, problem.base
    hot_share = base.hot_share if base.hot_share is not None else default_hot_share(ratio_u, base.policy)
    fixed = replace(base, hot_share=hot_share)
    if base.policy == "paper":  # the paper's threshold is per ratio: keep the uniform solution's for every table
        fixed = replace(fixed, threshold=base.threshold if base.threshold is not None else default_threshold(ratio_u))
    groups: Dict[Tuple[str, int], List[EmbeddingBagConfig]] = {}
    for t in tables:
        groups.setdefault((base.group or f"dim{t.embedding_dim}", t.embedding_dim), []).append(t)
    opt_row = {t.name: optimizer_state_bytes(problem.optimizer, 1, t.embedding_dim) for t in tables}
    row_bytes = {t.name: t.embedding_dim * BYTES_PER_VALUE[t.data_type] + opt_row[t.name] for t in tables}
    floor_ratio = spread * ratio_u

    def configs_at(price: float) -> Dict[str, CafeConfig]:
        configs: Dict[str, CafeConfig] = {}
        for (_, dim), members in groups.items():
            width = BYTES_PER_VALUE[members[0].data_type]
            hot_row = hot_row_bytes(dim, fixed.resolved(), width, len(members))
            kappa = hot_share / (1 - hot_share) * dim * width / hot_row
            want = [curves[t.name].count_at_least(price * row_bytes[t.name]) for t in members]
            floor = [max(1.0, t.num_embeddings * (1 - hot_share) / floor_ratio) for t in members]
            hashed = dict(
                zip((t.name for t in members), _hot_and_hashed([curves[t.name] for t in members], want, floor, kappa))
            )
            for t in members:
                rows = t.num_embeddings
                x = hashed[t.name]
                if x >= rows * (1 - hot_share):
                    configs[t.name] = replace(fixed, compression_ratio=1.0)  # wants (nearly) every id: plain
                else:
                    configs[t.name] = replace(fixed, compression_ratio=max(1.0, rows * (1 - hot_share) / x))
        return configs

    def evaluate(configs: Dict[str, CafeConfig]) -> Optional[Solution]:
        got = problem.fitting(configs)
        return None if got is None else (configs, got[0], got[1])

    top = top_value(list(curves.values()))
    hi_price = top / min(row_bytes.values()) * 2  # nothing is worth this: every table at its floor

    def bisect(frozen: Dict[str, CafeConfig]) -> Tuple[Optional[Solution], Optional[Dict[str, CafeConfig]]]:
        """(best fitting solution, configs of the cheapest failing price) for the price bisection."""
        failed: List[Dict[str, CafeConfig]] = []

        def attempt(price: float) -> Optional[Solution]:
            configs = {**configs_at(price), **frozen}
            got = evaluate(configs)
            if got is None:
                failed[:] = [configs]
            return got

        best = attempt(hi_price)
        if best is None:
            return None, None
        lo, hi = math.log(hi_price) - 80.0, math.log(hi_price)  # log(price): hi fits
        got = attempt(math.exp(lo))
        if got is not None:
            return got, None
        _, best = bisect_log(attempt, lo, hi, best, 1e-6)
        return best, failed[0] if failed else None

    # Tables whose size jumps at the final price (a small table turning plain: the paper's rule
    # keeps tables of <= 2000 / ratio rows uncompressed) differ between the last plan that fits
    # and the first that does not. Take their larger setting if it fits; else freeze them at the
    # smaller one and bisect again, so the other tables use the bytes left.
    frozen: Dict[str, CafeConfig] = {}
    overall = None
    for _ in range(4):
        best, over = bisect(frozen)
        if best is None:
            break
        if over is None:
            break
        jumping = [t.name for t in tables if over[t.name] != best[0][t.name] and t.name not in frozen]
        for name in jumping:
            got = evaluate({**best[0], name: over[name]})
            if got is not None:
                best = got
        if overall is None or sum(best[2].rank_bytes) > sum(overall[2].rank_bytes):
            overall = best
        if not jumping:
            break
        frozen.update({name: best[0][name] for name in jumping})
    return overall
