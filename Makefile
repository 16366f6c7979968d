# One entry point for a fresh Debian 12 machine (run as root):
#   make demo   run the demo with the embedded default config
#   make test   install everything the suite needs (system packages too) and run it
VENV ?= .venv
PYTHON ?= python3

.PHONY: demo test lint setup

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip 'setuptools>=70.1' wheel
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed
	scripts/install-system-packages

demo: $(VENV)/.installed
	scripts/demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest
