# Set-up is idempotent: the first target that needs .venv creates it, later runs reuse it
# until pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch keeps pip from pulling a multi-GB CUDA build on CPU machines; on a
# machine with an NVIDIA GPU the same pin takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup run test pull train eval bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

pull: $(STAMP)
	$(BIN)/senab models pull

run: $(STAMP)
	@if [ -z "$$SENAB_MODEL" ]; then $(BIN)/senab models pull >/dev/null; fi
	$(BIN)/senab serve

# The comparison of docs/evaluation.md: SENAB, LoRA and IA3 on the same data, then the report.
train: $(STAMP)
	$(BIN)/senab train --out runs/smollm2 --methods senab,lora,ia3 --steps 400 --train-windows 800 --state-windows 1200

eval: $(STAMP)
	$(BIN)/senab eval --run runs/smollm2 --out docs

# DESIGN section 10's targets, each script printing the ratios it measured in one run;
# results also go to bench/results/*.json.
bench: $(STAMP)
	@$(BIN)/senab models pull >/dev/null
	@status=0; for script in store decode server load; do $(BIN)/python bench/$$script.py || status=1; done; exit $$status

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
