"""Criteo's categorical cardinalities, the tables CAFE is sized for in the paper's experiments.

Kept in the library (torch-free) because the planner's command line, the example trainer's
synthetic stream and the benchmarks all size tables from them, and only the library is
importable by all three (the planner is installed as its own package, the examples are not)."""

from __future__ import annotations

from typing import Tuple

# Criteo Kaggle (Display Advertising Challenge): the table sizes of C1..C26 as DLRM and the CAFE paper use them.
KAGGLE_CARDINALITIES: Tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

# Criteo 1TB as the MLPerf DLRM reference hashes it (--max-ind-range=40000000).
TERABYTE_CARDINALITIES: Tuple[int, ...] = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)  # fmt: skip
