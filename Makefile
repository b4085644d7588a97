# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= test,crf

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m stego_jax.demo --workdir runs/demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: venv
	$(BIN)/python experiments/benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
