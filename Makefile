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

# simulate JOB WORKSPACE: run a job folder on 3 simulated sites, keep its log, print its report;
# fails unless the run completed (fedfms simulate judges it by its records, not nvflare's exit code).
define simulate
	@echo "running jobs/$(1) (3 sites, CPU demo profile); log: $(2)/simulator.log"
	rm -rf $(2)
	$(BIN)/fedfms simulate jobs/$(1) -w $(2) -n 3 -t 3
endef

# The jobs read demo/data* (relative to the repository), so the demo folder is fixed.
# FedMSA: the packaged LiteMedSAM fine-tuned with adapters; FM-instructed init: LiteMedSAM distilled into SM-lite.
demo: venv
	PATH="$(abspath $(BIN)):$$PATH" bash preprocessing/make_demo_data.sh demo
	$(call simulate,fedmsa_prostate,demo/workspace)
	$(call simulate,fminit_prostate,demo/workspace_fminit)

test: venv
	$(BIN)/python -m pytest -q tests --durations=30

clean-demo:
	rm -rf demo
