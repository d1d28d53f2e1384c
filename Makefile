# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
# torch and torchvision are pinned together, in the same pip command as everything else.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean-demo

venv: $(BIN)/fedfms

$(BIN)/fedfms: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PINS) -e '.[dev]'
	touch $@

demo: venv
	PATH="$(abspath $(BIN)):$$PATH" bash preprocessing/make_demo_data.sh $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_DIR)
