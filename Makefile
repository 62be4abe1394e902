# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the package with its dev tools.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m rpcstream demo

SOURCES := $(wildcard rpcstream tests examples benchmarks)

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: install
	$(BIN)/mypy --strict rpcstream

test: lint typecheck
	$(BIN)/python -m pytest

# The suite on every Python from 3.11 to 3.13 found here, each in its own .venv-3.x
# (pyenv's versions answer once PYENV_VERSION names them). Not part of `make test`.
VERSIONS := 3.11 3.12 3.13
test-all: lint typecheck
	@set -e; for v in $(VERSIONS); do \
		py=python$$v; \
		if ! $$py -V >/dev/null 2>&1 && command -v pyenv >/dev/null 2>&1; then \
			export PYENV_VERSION=$$(pyenv versions --bare | grep -E "^$$v\.[0-9]+$$" | tail -n 1); \
		fi; \
		if ! $$py -V >/dev/null 2>&1; then echo "test-all: no $$py here"; exit 1; fi; \
		[ -x .venv-$$v/bin/python ] || $$py -m venv .venv-$$v; \
		[ .venv-$$v/.installed -nt pyproject.toml ] || { \
			.venv-$$v/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' && \
			touch .venv-$$v/.installed; }; \
		echo "== Python $$v"; .venv-$$v/bin/python -m pytest; \
	done

bench: install
	$(BIN)/python -m rpcstream bench

clean:
	rm -rf $(VENV) .venv-3.* build *.egg-info .pytest_cache .mypy_cache .ruff_cache
