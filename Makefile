# The two commands a fresh machine needs: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE
# Where DeepSpeed's JIT-built ops live; scripts/setup.sh builds the CPU comm op there once.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/distill/torch_extensions

.PHONY: setup setup-vllm demo test test-fast lint bench lock lock-newest

setup:
	@bash scripts/setup.sh

# The vLLM environment (.venv-vllm) for teacher.backend=vllm|endpoint and their tests (scripts/setup_vllm.sh).
setup-vllm:
	@bash scripts/setup_vllm.sh

demo: setup
	$(VENV)/bin/distill demo

# Two pytest-xdist workers: while one waits on Ray actors or other processes, the other runs (fresh-clone CI:
# 1908 s against 1998 s in one process, both beside a bench at nice 19). PYTEST_WORKERS= runs one process.
PYTEST_WORKERS ?= -n 2

test: setup setup-vllm
	$(VENV)/bin/python -m pytest tests $(PYTEST_WORKERS)

test-fast: setup
	$(VENV)/bin/python -m pytest tests -m "not slow" $(PYTEST_WORKERS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python bench/loss_memory.py

lock: setup
	bash scripts/lock.sh

lock-newest: setup
	bash scripts/lock.sh --newest
