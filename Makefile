# make test: create .venv if missing, install calico-jax with its test and AOT-plan extras (CI pins), lint (ruff),
# run pytest.
# make lint: ruff only (rules in pyproject.toml [tool.ruff]).
# make demo: same venv; synthetic data -> train a small CALICO on CPU -> evaluate held-out pairs (runs/demo/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=20
DEMO_ARGS ?=

.PHONY: test lint demo install clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test,tpu-aot,gpu-aot]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m calico_jax.demo --workdir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
