# Open MoE Trainer Lab — the two commands a newcomer needs:
#   make demo   set up, then run the main job on the embedded demo corpus (CPU, a few minutes)
#   make test   set up, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned by a constraints file, so no other package can pull in a
# multi-GB CUDA build on a CPU machine. GPU users: TORCH_SPEC="torch" (or your CUDA wheel).
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# caches and state of the tools stay in the project, not under $HOME
export MPLCONFIGDIR ?= $(abspath .cache/matplotlib)

.PHONY: help setup demo test test-fast clean browser coverage restore

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[all]"
	touch $@

setup: $(STAMP)  ## create .venv and install the project with every extra

# The demo is the pipeline itself, run as the Prefect flow (flows/pipeline.py, a temporary local Prefect
# server): every DVC stage of dvc.yaml that is not up to date (all of them on a fresh clone), one MLflow
# run per stage under a pipeline run in mlflow/mlflow.db, the models registered as @candidate, the gate,
# and @champion when it passes. `dvc repro` runs the same stages without Prefect and the registry.
demo: setup  ## run the whole pipeline on the embedded demo corpus (Prefect flow over the DVC stages), CPU, 6-12 min on 2 cores (host-dependent)
	mkdir -p mlflow/store/prefect  # Prefect creates its home's last folder only (a fresh clone has no mlflow/store)
	PATH="$(abspath $(BIN)):$$PATH" PREFECT_HOME="$(abspath mlflow/store/prefect)" \
		MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow)/mlflow.db}" $(BIN)/python flows/pipeline.py
	@echo; echo "== MoE vs dense baseline at equal training FLOPs (outputs/evaluate/compare.md)"; cat outputs/evaluate/compare.md
	@echo "== LoRA fine-tune, before -> after (outputs/finetune/compare.md)"; cat outputs/finetune/compare.md
	@echo "== benchmark tasks, accuracy (outputs/benchmark/compare.md)"; cat outputs/benchmark/compare.md
	@echo "== int8 experts: sizes, per-expert errors, perplexity gate (outputs/quantize/report.md)"; cat outputs/quantize/report.md
	@echo "== ONNX export: parity with stock transformers, latency (outputs/export/report.md)"; cat outputs/export/report.md
	@echo "== router analytics: outputs/analyze/report.html   data report: outputs/data/validation/index.html"
	@echo "== benchmark gate: outputs/gate/report.md   MLflow UI: make mlflow-ui   lineage: $(BIN)/moe-lab lineage models:/moe-lab@champion"

browser:  ## headless Chromium (Debian's package) for the browser tests of the reports, if missing
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }

# Coverage of moe_engine in every process the tests start (pyproject.toml [tool.coverage]); the report is
# printed, and the run fails below the floor (90% of the core: moe_engine without its GPU-only kernels).
# --no-loadscope-reorder: the files are handed out in tests/conftest.py's order (longest first); xdist's
# default reorders them by test count, which started the 6-test orchestration file among the last.
test: setup browser  ## run the whole test suite with coverage (fails below 90% of the core)
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(abspath .coverage) OMP_NUM_THREADS=1 $(BIN)/python -m coverage run -m pytest -q -n 2 --dist loadfile \
		--no-loadscope-reorder
	COVERAGE_FILE=$(abspath .coverage) $(BIN)/python -m coverage combine -q
	COVERAGE_FILE=$(abspath .coverage) $(BIN)/python -m coverage report

coverage: test  ## the test suite, then the HTML coverage report in outputs/coverage/index.html
	COVERAGE_FILE=$(abspath .coverage) $(BIN)/python -m coverage html -d outputs/coverage

test-fast: setup browser  ## skip the slow tests
	$(BIN)/python -m pytest -q -m "not slow"

restore: setup  ## after a failed `dvc repro`: put back every stage's last good outputs (dvc.lock) that DVC removed, from its cache
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tasks.dvc_stage restore $(STAGES)

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs mlruns .pytest_cache

# --- orchestration: local services (127.0.0.1 only; state in mlflow/, see mlflow/README.md) -------------
.PHONY: services-up services-down prefect-up prefect-down mlflow-ui deploy pipeline-flow
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
SERVICES = BIN="$(abspath $(BIN))" PREFECT_PORT=$(PREFECT_PORT) MLFLOW_PORT=$(MLFLOW_PORT) mlflow/services.sh

services-up: setup  ## start the MLflow server, the Prefect server + process worker, and deploy prefect.yaml
	$(SERVICES) up
	$(MAKE) --no-print-directory deploy

services-down:  ## stop the Prefect worker, the Prefect server and the MLflow server
	$(SERVICES) down

prefect-up: setup  ## start only the Prefect server + process worker (flows log to mlflow/mlflow.db)
	$(SERVICES) up prefect

prefect-down:  ## stop only the Prefect worker and server
	$(SERVICES) down prefect

mlflow-ui: setup  ## MLflow UI on http://127.0.0.1:5000 over mlflow/mlflow.db (foreground; Ctrl-C stops it)
	$(SERVICES) ui

deploy: setup  ## create the deployments of prefect.yaml (nightly, on-demand, gate) on the running Prefect server
	eval "$$($(SERVICES) env)" && $(BIN)/prefect --no-prompt deploy --all

# Uses the running services when they are up; otherwise a temporary Prefect server and mlflow/mlflow.db.
pipeline-flow: setup  ## run the pipeline flow once, in this shell; e.g. ARGS="--steps 50 --set pretrain.lr=1e-3"
	@if curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null; then eval "$$($(SERVICES) env)"; fi; \
	if curl -sf http://127.0.0.1:$(MLFLOW_PORT)/health >/dev/null; then export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT); fi; \
	PATH="$(abspath $(BIN)):$$PATH" PREFECT_HOME="$${PREFECT_HOME:-$(abspath mlflow/store/prefect)}" $(BIN)/python flows/pipeline.py $(ARGS)
