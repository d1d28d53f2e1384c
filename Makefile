# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned together, in the same pip command as everything else.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean-demo

venv: $(BIN)/fedfms

$(BIN)/fedfms: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PINS) -e '.[dev]'
	touch $@

# The jobs read demo/data (relative to the repository), so the demo folder is fixed.
demo: venv
	PATH="$(abspath $(BIN)):$$PATH" bash preprocessing/make_demo_data.sh demo
	@echo "running the federated FedMSA job (3 sites, CPU demo profile); log: demo/workspace/simulator.log"
	rm -rf demo/workspace
	$(BIN)/nvflare simulator jobs/fedmsa_prostate -w demo/workspace -n 3 -t 3 > demo/workspace.log 2>&1 || (tail -n 40 demo/workspace.log; exit 1)
	mv demo/workspace.log demo/workspace/simulator.log
	$(BIN)/fedfms report demo/workspace

test: venv
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf demo
