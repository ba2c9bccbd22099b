# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test lint native protos check-protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup
	PYTHON=$(PYTHON) bash scripts/setup
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lego demo

test: setup
	bash scripts/ensure-etcd
	-bash scripts/build-native
	-bash scripts/ensure-browser
	-bash scripts/ensure-compose
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

native: setup
	bash scripts/build-native

protos: setup
	bash scripts/gen-protos

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/native
