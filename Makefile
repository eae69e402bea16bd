# Two commands from a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project into it first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: the CPU build on CPU-only CI machines, the CUDA 12 build from PyPI elsewhere.
# Keep your own torch with `make TORCH= ...` (any torch>=2.1 works).
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install  # interim main job until `dali-arb demo` lands: index metadata, bucket report, first steps of a plan
	mkdir -p out
	$(VENV)/bin/dali-arb index examples/sample-metadata.csv -o out/sample.parquet -q
	$(VENV)/bin/dali-arb buckets out/sample.parquet --batch-size 8 --world-size 2
	$(VENV)/bin/dali-arb plan out/sample.parquet --batch-size 8 --world-size 2 --rank 0 | head -n 3

lint: install
	$(VENV)/bin/ruff check dali_arb tests benchmarks examples

test: install lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
