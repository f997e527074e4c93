# The two commands of the README. Both create .venv when it is missing and install everything into it:
# torch 2.13.0 first (so no package pulls a multi-GB CUDA build on a CPU machine), then rlhfchat with every extra,
# pinned by constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlhfchat-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean-demo

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[chat,discord,eval,postgres,dev,qlora]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhfchat pipeline recipes/tiny-cpu.yaml

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/tiny-cpu
