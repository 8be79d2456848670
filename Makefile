# make train: the paper's Model 2 (improved, five classes); make paper: the paper's whole experiment and report;
# make test: the default test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train paper test test-slow lint format

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

train: install
	$(PY) train.py model=improved data=five_class $(ARGS)

paper: install
	$(PY) paper.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
