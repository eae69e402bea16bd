# Two commands from a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project into it first (once; again when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: CI machines find a CPU build of it on local disk; elsewhere PyPI serves the CUDA 12 build.
# Keep your own torch with `make TORCH= ...` (any torch>=2.1 works).
TORCH ?= torch==2.13.0

.PHONY: demo test lint docs install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test,examples,jax]"
	touch $@

demo: install
	$(VENV)/bin/dali-arb demo

lint: install
	$(VENV)/bin/ruff check dali_arb support tests benchmarks examples
	$(VENV)/bin/ruff format --check dali_arb support tests benchmarks examples
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/lint-imports --no-logo --no-cache   # the layers ([tool.importlinter] in pyproject.toml)

test: install lint
	$(PY) -m pytest

# The docs site (mkdocs.yml, docs/): --strict makes every warning (a broken link or anchor, a page missing from the
# nav, a missing include) an error. Output in build/site; `$(VENV)/bin/mkdocs serve` previews while writing.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
