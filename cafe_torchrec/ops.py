"""The C++ CPU ops (csrc/): built once per source change by torch's cpp_extension, cached.

`torch.ops.cafe.sketch_insert / sketch_query / make_keys / remap_lookup / occurrence_scores`
exist after
`available()` returns True. Every op has a torch-ops twin used on other devices (CUDA) and
when the build is unavailable; CAFE_KERNEL=torch forces the twins everywhere.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("hot_sketch.cpp", "remap.cpp", "importance.cpp")]


@lru_cache(maxsize=1)
def available() -> bool:
    """True once the ops are registered; the first call compiles them (~30 s, then cached)."""
    if os.environ.get("CAFE_KERNEL", "auto") == "torch":
        return False
    if hasattr(torch.ops, "cafe") and hasattr(torch.ops.cafe, "occurrence_scores"):
        return True
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: ATen's parallel_for is inline, and without it runs on one thread; the
        # library links the libgomp torch has loaded (same soname), so torch.set_num_threads rules
        load(name="cafe_ops", sources=[str(s) for s in _SOURCES], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], extra_include_paths=[str(_SOURCES[0].parent)], is_python_module=False, verbose=False)
    except Exception as err:  # a missing compiler must not stop training: fall back, loudly
        logger.warning("CAFE C++ ops unavailable (%s); using the torch-ops kernels", err)
        return False
    return True


def use_cpp(tensor: torch.Tensor) -> bool:
    """Whether the C++ op applies to this tensor (CPU and built)."""
    return tensor.device.type == "cpu" and available()
