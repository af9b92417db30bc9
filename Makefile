# The README's two commands: `make demo` (set up, train the embedded default, decode)
# and `make test` (set up, lint, run the whole suite). .ci/run calls `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.PHONY: setup setup-test setup-gpu-aot demo test lint
setup: $(BIN)/python
	$(BIN)/pip install -q -e .

setup-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

# jax's CUDA plugin in a folder of its own (.venv-gpu-aot), for compiling for a GPU on a machine
# without one: PYTHONPATH=.venv-gpu-aot .venv/bin/python -m benchmarks.memory --peft --target h100
setup-gpu-aot: setup-test
	V=$$($(BIN)/python -c 'import jax; print(jax.__version__)') && $(BIN)/pip install -q \
	  --target .venv-gpu-aot --no-deps "jax-cuda12-plugin==$$V" "jax-cuda12-pjrt==$$V"

demo: setup
	$(BIN)/python train.py --config configs/demo.py --workdir $(WORKDIR)
	printf 'add: 17 + 25\nreverse: a b c d\nsort: 9 3 7 1\nnumber to words: 342\n' | $(BIN)/python decode.py --checkpoint $(WORKDIR)
	@echo 'More prompts: source $(VENV)/bin/activate, then: echo "add: 8 + 5" | python decode.py --checkpoint $(WORKDIR)'

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -n 2 -q
