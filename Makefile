# `make demo` and `make test` each set up .venv on first use (Python 3.11), then run.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline: no hub downloads, no update checks, no telemetry (see README, "Configuration").
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup test demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision are pinned together in one command (a mismatched pair breaks torchvision's ops)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# img2dataset pulls the Python 3.6 `dataclasses` backport, which breaks Prefect's server process
	$(BIN)/pip uninstall -y -q dataclasses
	touch $(STAMP)

# the browser test (tests/test_ui_report.py) needs Debian's chromium: installed when missing, if apt-get is
# here and we are root; a failed install only prints a line (the test then skips, saying why)
setup: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
	      || echo "setup: could not install chromium with apt-get; the browser test will not run"; \
	  else \
	    echo "setup: chromium is missing (install Debian's chromium as root); the browser test will not run"; \
	  fi; }

# two workers: most of the suite waits on subprocesses, servers and sockets; tests sharing the demo run
# stay on one worker (xdist_group "demo")
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/rs5m demo --workdir rs5m-demo

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/bench_keyword.py
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_download.py

clean:
	rm -rf rs5m-demo .pytest_cache
