"""Packages cafe_torchrec and planner/ (installed as cafe_planner), and compiles the C++ CPU ops
into cafe_torchrec/_C with torch's BuildExtension, against the torch installed in the build
environment (use `pip install --no-build-isolation`: the library must match the runtime torch).

CAFE_BUILD_OPS=0 leaves the ops out of an install: the Makefile installs the checkout editable
that way and compiles the ops in place with `setup.py build_ext --inplace`, whose object files
under build/ a later wheel build reuses instead of compiling again."""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as err:  # an isolated build environment has no torch, or another one
    raise SystemExit(
        "cafe-torchrec compiles its C++ ops against the torch you run: install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from err

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("cafe_ops_build", HERE / "cafe_torchrec" / "ops.py")
ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ops)  # the source list, flags and hash the runtime loader checks

library = find_packages(include=["cafe_torchrec", "cafe_torchrec.*"])
planner = ["cafe_planner" + name[len("planner") :] for name in find_packages(include=["planner", "planner.*"])]
extension = CppExtension(
    "cafe_torchrec._C",
    sources=[f"cafe_torchrec/csrc/{name}" for name in ops.SOURCES],
    include_dirs=[str(HERE / "cafe_torchrec" / "csrc")],
    extra_compile_args=ops.COMPILE_ARGS + [f"-DCAFE_SOURCE_HASH={ops.source_hash()}"],
    extra_link_args=ops.LINK_ARGS,
)
build_ops = os.environ.get("CAFE_BUILD_OPS", "1") != "0"
setup(packages=library + planner, ext_modules=[extension] if build_ops else [], cmdclass={"build_ext": BuildExtension})
