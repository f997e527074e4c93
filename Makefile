# The two commands of the README. Both create .venv when it is missing and install everything into it:
# torch 2.13.0 first (so no package pulls a multi-GB CUDA build on a CPU machine), then rlhfchat with every extra,
# pinned by constraints.txt. DS_BUILD_OPS=0: DeepSpeed installs without compiling its CUDA kernels (it runs on CPUs in
# the tests; on GPUs it builds the kernels it needs when they are first used).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlhfchat-installed
PYTEST_ARGS ?=
# The demos' figures were measured with one thread: on a shared 2-core machine torch's default of 2 was ~9x slower.
DEMO_THREADS ?= 1

.PHONY: demo demo-grpo test install clean-demo

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -e '.[chat,discord,eval,postgres,dev,qlora]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/rlhfchat pipeline recipes/tiny-cpu.yaml

demo-grpo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/rlhfchat pipeline recipes/tiny-cpu-grpo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/tiny-cpu runs/tiny-cpu-grpo
