# One command to set up and run the default job, one to set up and run the tests (CI runs `make test`).
VENV ?= .venv
PYTHON ?= python3
ARGS ?=
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

CONFIG ?= search_spaces/examples/tiny-sisr.yaml

.PHONY: setup run search test
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/pngrow run $(ARGS)

search: $(VENV)/.installed
	$(VENV)/bin/pngrow search $(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
