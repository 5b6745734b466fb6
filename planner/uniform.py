"""The uniform split: one compression ratio for every table, the smallest that fits every rank.

Found by bisection in log(ratio); hot share and threshold are the paper's defaults for that
ratio (CafeConfig). The profiled split (profiled.py) starts from this ratio.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from cafe_torchrec.config import CafeConfig
from cafe_torchrec.layout import CafePlan

from cafe_planner.estimators import OptimizerLike
from cafe_planner.fitting import bisect_log, fitting_plan, infeasible_error
from cafe_planner.placement import Assignment


def uniform_configs(tables: Sequence[EmbeddingBagConfig], base: CafeConfig, ratio: float) -> Dict[str, CafeConfig]:
    """`base` at `ratio` for every table."""
    return {t.name: replace(base, compression_ratio=float(ratio)) for t in tables}


def bisect_ratio(tables: Sequence[EmbeddingBagConfig], base: CafeConfig, world_size: int, opt: OptimizerLike,
                 caps: Sequence[int], rw_share: float, max_ratio: float) -> Tuple[float, CafePlan, Assignment]:
    """The smallest common ratio in [1, max_ratio] whose plan fits every rank."""

    def attempt(r: float) -> Optional[Tuple[CafePlan, Assignment]]:
        return fitting_plan(tables, uniform_configs(tables, base, r), world_size, opt, caps, rw_share)

    found = attempt(1.0)
    if found is not None:
        return 1.0, found[0], found[1]
    best = attempt(max_ratio)
    if best is None:
        raise infeasible_error(tables, uniform_configs(tables, base, max_ratio), world_size, opt, caps, rw_share,
                               f"even at the highest ratio tried ({max_ratio:g}x)")
    # log(ratio): 0 (ratio 1) does not fit, log(max_ratio) fits
    hi, best = bisect_log(attempt, 0.0, math.log(max_ratio), best, 1e-5)
    return math.exp(hi), best[0], best[1]
