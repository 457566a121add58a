# make test: create .venv if missing, install calico-jax with its test extra (CI pins), run pytest.
# make demo: same venv; synthetic data -> train a small CALICO on CPU -> evaluate held-out pairs (runs/demo/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := .ci/constraints.txt
PYTEST_ARGS ?= -n 2 --dist loadfile
DEMO_ARGS ?=

.PHONY: test demo install clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m calico_jax.demo --workdir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
