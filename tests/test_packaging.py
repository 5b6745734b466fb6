"""The wheel carries the compiled C++ ops and their sources, loads them without compiling, and
declares the library's real needs (the examples' in an extra).

The wheel is built in-tree (pip wheel --no-build-isolation), so it reuses the object files that
`make` compiled under build/ for the in-place ops: seconds, not a second compile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from cafe_torchrec import ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("cafe_torchrec-*.whl")
    return path


def test_wheel_holds_the_compiled_ops_their_sources_and_the_planner(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    libraries = [n for n in names if n.startswith("cafe_torchrec/_C") and n.endswith(".so")]
    assert len(libraries) == 1, names
    for source in ops.SOURCES + ops.HEADERS:
        assert f"cafe_torchrec/csrc/{source}" in names
    assert "cafe_planner/__init__.py" in names and "cafe_planner/planner.py" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    built = zipfile.ZipFile(wheel).read(libraries[0])
    marker = built[built.find(ops.MARKER) + len(ops.MARKER) :][:16].decode()
    assert marker == ops.source_hash()  # built from the sources it ships


def test_wheel_metadata_names_the_library_needs_and_an_examples_extra(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = Parser().parsestr(archive.read(meta).decode())
    requires = metadata.get_all("Requires-Dist")
    core = sorted(r for r in requires if "extra ==" not in r)
    assert core == ["numpy", "torch<2.14,>=2.13", "torchrec<1.9,>=1.8"], core
    examples = [r.split(";")[0].strip() for r in requires if 'extra == "examples"' in r]
    assert {r.split(">")[0].split("=")[0] for r in examples} == {"torchx", "torchmetrics", "tqdm", "matplotlib"}


def test_installed_wheel_loads_its_prebuilt_ops_without_compiling(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "import cafe_torchrec.ops as ops\n"
        f"assert ops.__file__.startswith({str(target)!r}), ops.__file__\n"
        "assert ops.available()\n"
        "maps = open('/proc/self/maps').read()\n"
        f"assert {str(target)!r} + '/cafe_torchrec/_C' in maps, 'the prebuilt library is not the one loaded'\n"
        "assert 'torch_extensions' not in maps, 'a just-in-time build was loaded'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAFE_KERNEL")}
    env["PYTHONPATH"] = str(target)
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "CAFE C++ ops" not in done.stderr  # no fallback warning


def test_a_library_built_from_other_sources_is_not_loaded(tmp_path: Path, monkeypatch) -> None:
    csrc = tmp_path / "csrc"
    shutil.copytree(ops.CSRC, csrc)
    assert ops.source_hash(csrc) == ops.source_hash()
    with open(csrc / "remap.cpp", "a") as f:
        f.write("\n// an edit\n")
    assert ops.source_hash(csrc) != ops.source_hash()
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\0ELF..." + ops.MARKER + ops.source_hash(csrc).encode() + b"\0")
    assert ops._built_from(str(fake)) == ops.source_hash(csrc) != ops.source_hash()
    monkeypatch.setattr(ops, "_prebuilt_libraries", lambda: [str(fake)])
    reason = ops._load_prebuilt()  # refused from its marker, before any dlopen of the stale file
    assert reason is not None and "other sources" in reason
