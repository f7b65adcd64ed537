# README's two commands: `make demo` trains the embedded default, `make test` runs the suite.
# Both create .venv and install latentgen into it (editable, with test extras) on first use, together
# with every plugin package under plugins/ (each a folder with its own pyproject.toml), whose tests
# `make test` runs too (pyproject's testpaths).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLUGIN_PROJECTS := $(wildcard plugins/*/pyproject.toml)

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PLUGIN_PROJECTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]' $(foreach project,$(PLUGIN_PROJECTS),-e '$(dir $(project))')
	touch $@

demo: install
	$(BIN)/latentgen-train experiment=shapes_composed

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info plugins/*/src/*.egg-info .pytest_cache
