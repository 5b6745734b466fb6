"""The C++ CPU ops (csrc/): compiled when the package is built or installed, as FBGEMM and
TorchRec ship theirs; compiled on first use only as a fallback.

`torch.ops.cafe.sketch_insert / sketch_query / prepare_ids / remap_lookup / occurrence_scores`
exist after `available()` returns True. It loads, in order:
1. the library built with the package (`cafe_torchrec/_C*.so`, setup.py), if it was built from
   the sources beside it (their hash is compiled in: an edited checkout never runs stale ops);
2. else a just-in-time build by torch's cpp_extension (~30-45 s once, cached under
   ~/.cache/torch_extensions), with a warning saying why;
3. else nothing: every op has a torch-ops twin (the CUDA path), ~3x slower on CPU, used with a
   warning that says so.
Which kernel runs is decided once per collection (or sketch) by `resolve_kernel`: the
collection's `kernel` argument, else CAFE_KERNEL (auto | cpp | torch), with "cpp" an error when
the C++ ops cannot run.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import List

import torch

logger = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = ["hot_sketch.cpp", "remap.cpp", "importance.cpp", "serving.cpp", "build_info.cpp"]
HEADERS = ["common.h"]
COMPILE_ARGS = ["-O3", "-fopenmp"]  # -fopenmp: ATen's inline parallel_for is serial without it; the
LINK_ARGS = ["-fopenmp"]  # library links the libgomp torch has loaded, so torch.set_num_threads rules
MARKER = b"cafe-source-hash:"  # csrc/build_info.cpp
KERNELS = ("auto", "cpp", "torch")


def source_hash(csrc: Path = CSRC) -> str:
    """A hash of the C++ sources and headers: compiled into the library, compared at load."""
    digest = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS):
        digest.update(name.encode())
        digest.update((csrc / name).read_bytes())
    return digest.hexdigest()[:16]


def kernel_choice() -> str:
    """CAFE_KERNEL: 'auto' (C++ on CPU when it loads), 'cpp' (C++ or an error), 'torch'."""
    choice = os.environ.get("CAFE_KERNEL", "auto")
    if choice not in KERNELS:
        raise ValueError(f"CAFE_KERNEL must be one of {KERNELS}, got {choice!r}")
    return choice


def resolve_kernel(requested: str, device: torch.device) -> str:
    """'cpp' or 'torch' for work on `device`. `requested` 'auto' follows CAFE_KERNEL (default:
    the C++ ops on CPU when they load, else the torch-ops twins); 'cpp' raises where the C++
    ops cannot run (another device, or no build)."""
    if requested not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {requested!r}")
    choice = kernel_choice() if requested == "auto" else requested
    if choice == "torch":
        return "torch"
    if device.type != "cpu":
        if choice == "cpp":
            raise ValueError(f"kernel 'cpp' runs on CPU tensors only, not on {device}")
        return "torch"
    if available():
        return "cpp"
    if choice == "cpp":
        raise RuntimeError("kernel 'cpp' was asked for, but the C++ ops neither load nor build (see the warning)")
    return "torch"


@lru_cache(maxsize=1)
def available() -> bool:
    """True once the C++ ops are registered (see the module docstring for the order tried)."""
    if _registered():
        return True
    reason = _load_prebuilt()
    if reason is None:
        return True
    logger.warning(
        "CAFE C++ ops: %s; compiling them now (~30-45 s, cached). Build them at install time "
        "with `pip install --no-build-isolation .` (or `make`)",
        reason,
    )
    try:
        _load_just_in_time()
        return True
    except Exception as err:  # a missing compiler must not stop training: fall back, loudly
        logger.warning(
            "CAFE C++ ops unavailable (%s; build failed: %s). Using the torch-ops kernels: the same "
            "results, ~3x slower CAFE id work on CPU. Set CAFE_KERNEL=torch to choose them silently, "
            "CAFE_KERNEL=cpp to make this an error",
            reason,
            err,
        )
        return False


def _registered() -> bool:
    return hasattr(torch.ops, "cafe") and hasattr(torch.ops.cafe, "occurrence_scores")


def _prebuilt_libraries() -> List[str]:
    return sorted(glob.glob(str(Path(__file__).parent / "_C*.so")))


def _load_prebuilt() -> "str | None":
    """Load the library built with the package; None on success, else why not."""
    libraries = _prebuilt_libraries()
    if not libraries:
        return "no prebuilt library in the package (installed without building extensions?)"
    built = _built_from(libraries[0])
    if built != source_hash():
        return f"the prebuilt library was built from other sources (hash {built}, sources {source_hash()})"
    try:
        torch.ops.load_library(libraries[0])
    except OSError as err:
        return f"the prebuilt {Path(libraries[0]).name} does not load ({err}; built for another torch?)"
    return None


def _built_from(library: str) -> str:
    """The source hash csrc/build_info.cpp compiled into a library file ('' if none)."""
    data = Path(library).read_bytes()
    at = data.find(MARKER)
    return data[at + len(MARKER) : at + len(MARKER) + 16].decode(errors="replace") if at >= 0 else ""


def _load_just_in_time() -> None:
    from torch.utils.cpp_extension import load

    # named by the sources' hash, so torch's cache never mixes two builds
    load(
        name=f"cafe_ops_{source_hash()}",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=COMPILE_ARGS,
        extra_ldflags=LINK_ARGS,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=False,
    )
