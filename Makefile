# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv with the pinned stack on first use. `make lint` checks style and types.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-sketch clean

OPS := $(VENV)/.ops-built

$(STAMP): requirements.txt setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	CAFE_BUILD_OPS=0 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the C++ ops, compiled in place (cafe_torchrec/_C*.so) when their sources change
$(OPS): $(STAMP) $(wildcard cafe_torchrec/csrc/*)
	$(PY) setup.py -q build_ext --inplace
	touch $(OPS)

demo: $(OPS)
	$(PY) -m examples.demo

test: $(OPS)
	$(PY) -m pytest -q tests

# ruff (lint, then formatting) on the tree; mypy on the library and the planner. mypy sees planner/
# under its installed name cafe_planner through a link in build/mypy (pyproject.toml's mypy_path).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	mkdir -p build/mypy && ln -sfn ../../planner build/mypy/cafe_planner
	$(PY) -m mypy -p cafe_torchrec -p cafe_planner

bench-sketch: $(OPS)
	$(PY) -m benchmarks.sketch

clean:
	rm -rf $(VENV) build *.egg-info cafe_torchrec/_C*.so
