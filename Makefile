# Set-up is idempotent: the first target that needs .venv creates it, later runs reuse it
# until pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned torch keeps pip from pulling a multi-GB CUDA build on CPU machines; on a
# machine with an NVIDIA GPU the same pin takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup browser run test pull train eval bench screenshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

# Debian's Chromium for the page's browser tests: Playwright's own browser download needs
# internet access. Installed when running as root with apt-get; elsewhere install Chromium
# yourself or set SENAB_CHROMIUM, or the browser tests are skipped.
browser:
	@if [ -n "$$SENAB_CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else \
		echo "note: no chromium and no root apt-get: the browser tests will be skipped (set SENAB_CHROMIUM)" >&2; \
	fi

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

test: $(STAMP) browser
	$(BIN)/python -m pytest

# docs/ui-dashboard.png: the page after a real conversation (default model, Redis at REDIS_URL).
screenshot: $(STAMP) browser
	@$(BIN)/senab models pull >/dev/null
	$(BIN)/python -m tests.ui_screenshot --out docs/ui-dashboard.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
