# Quick start: `make run` (install + whole pipeline) and `make test` (install + tests).
# `make help` lists every target.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat bench/requirements.txt requirements.lock | cksum | cut -d' ' -f1)
# Tests run with bytecode writing on, as users' Python does (__pycache__/ must not change what
# DVC hashes: .dvcignore), even where the environment turns it off.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest
UI_PORT ?= $(shell sed -n 's/^ *ui_port: *\([0-9]*\).*/\1/p' params.yaml)

# The virtualenv's python is the `python` that dvc.yaml commands run; everything stays offline.
export PATH := $(BIN):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help install data run repro lint test test-deps test-fast test-stack ui prefect schedule clean serve bench-setup bench-train bench-serve bench-data bench-feedback tune monitor page plots bench-monitor

help: ## Show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-z-]+:.*## /{printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.lock
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv and install the pinned dependencies (CPU torch)

# Bring your own table (flows/own_data.py): SRC a CSV or Parquet file, TARGET its label column,
# DELIM a CSV's field separator (default ,; DELIM=';'), REPROFILE=1 to replace suites/<name>.json.
DELIM ?= ,
DATA_USAGE := usage: make data SRC=path/to/table.csv TARGET=column [DELIM=';'] [REPROFILE=1]
data: install ## Point the project at your table: make data SRC=path/to/table.csv TARGET=column
	@test -n "$(SRC)" -a -n "$(TARGET)" || { echo "$(DATA_USAGE) (CSV or Parquet)" >&2; exit 2; }
	$(BIN)/python -m flows.own_data "$(SRC)" --target "$(TARGET)" --delimiter '$(DELIM)'$(if $(REPROFILE), --reprofile)

# One run per workspace at a time (stages/common/runlock.py): while another `make run`,
# `make repro` or scheduled run holds it, these refuse, naming it; WAIT=1 waits for it instead.
# REMOTE=1: submit the run to the stack's work pool (`make up`) and wait for it; the worker runs
# the same flow on the servers (flows/remote.py).
run: install ## Run the whole pipeline through the Prefect flow (REMOTE=1: on the stack's worker; WAIT=1: queue)
	$(if $(REMOTE),$(BIN)/python -m flows.remote run --repo .,$(BIN)/python -m flows.pipeline --repo .$(if $(WAIT), --wait))

repro: install ## Run the same stages with `dvc repro`, then push the data versions (WAIT=1 as for run)
	$(BIN)/python -m flows.repro --repo .$(if $(WAIT), --wait)

# Optuna search over train values (params.yaml tune section; flows/tune.py): TRIALS=N is the
# number of finished trials the study (one per data version and model family) should hold, so a
# killed `make tune` resumes; the best trial's values are written into params.yaml (comments kept).
tune: install ## Tune train params with Optuna, write the best into params.yaml (TRIALS=N FAMILY=gbdt SWITCH=1)
	$(BIN)/python -m flows.tune --repo .$(if $(TRIALS), --trials $(TRIALS))$(if $(FAMILY), --model $(FAMILY))$(if $(SWITCH), --switch)$(if $(WAIT), --wait)

# ruff (format + check) and the import rules (pyproject.toml [tool.importlinter], ARCHITECTURE.md).
lint: install ## Check formatting, lint findings and what may import what (ruff, import-linter)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# bench-setup first: the Lightning benchmark smoke test runs instead of skipping.
test: install test-deps lint bench-setup ## Lint, then the test suite (real MLflow, DVC, GX, Prefect, PostgreSQL in temp dirs)
	$(PYTEST) -m "not stack"

# The longest end-to-end runs (make data + make run on three real tables, reproduce from the DVC
# remote, incremental runs): CI runs them after `make test` (.ci/run), which keeps `make test`
# under 20 minutes on 2 cores.
test-stack: install test-deps ## Run the longest end-to-end tests (marker `stack`); .ci/run runs them too
	$(PYTEST) -m stack

# The SQL ingest tests start a real PostgreSQL server (tests/postgres.py): install it when its
# binaries are missing and we may (root, e.g. CI containers); otherwise those tests skip.
# The browser tests (tests/browser/) drive the distribution's Chromium through Playwright
# (Playwright's own browser download needs the internet).
test-deps: ## Install the PostgreSQL server and Chromium the tests use (apt-get, when root)
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; } || \
	  echo "PostgreSQL not installed (need root for apt-get): the SQL and stack tests skip, make up fails"
	@command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "Chromium not installed (need root for apt-get): the browser tests fail"

# The edit-run loop: under 3 minutes on 2 cores (`slow`: torchrun, SIGKILL resume, hot swap,
# whole-pipeline runs; `make test` still runs them).
test-fast: install lint bench-setup ## Lint, then the tests without the slow end-to-end ones (< 3 min)
	$(PYTEST) -m "not slow and not stack"

# MLflow 3 opens in GenAI mode, where "Models" is hidden; the URL below opens the model-training
# view. MLflow remembers the choice only once "Model training" is clicked in the sidebar switch.
ui: install ## Open the MLflow UI on 127.0.0.1 in its model-training view (runs, metrics, plots, registry)
	@echo "MLflow UI, model-training view: http://127.0.0.1:$(UI_PORT)/#/?workflowType=machine_learning"
	@echo "  (click 'Model training' in the sidebar switch once and the browser keeps it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db \
	  --default-artifact-root ./mlflow/artifacts --host 127.0.0.1 --port $(UI_PORT)

# A persistent Prefect API for `make run`: while this runs, `make run` records its flow runs
# here (UI at http://127.0.0.1:4200) instead of starting a temporary server each time (~4-8 s).
prefect: install ## Keep a local Prefect server on 127.0.0.1:4200 (UI, run history); make run uses it
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

schedule: install ## Serve the pipeline (cron + retraining trigger) and the monitor (monitor.cron); starts a local Prefect server
	$(BIN)/python -m flows.schedule --repo .

serve: install ## Serve the registry's champion on 127.0.0.1 (settings: params.yaml `serve`; ARGS='--port 9000')
	$(BIN)/python -m flows.serve $(ARGS)

# Monitoring (flows/monitor.py, params.yaml `monitor`): the service's prediction log since the
# last check against the champion's training data; a crossed threshold emits the Prefect event on
# which the pipeline deployment (make schedule, make up) retrains. `make schedule` runs it hourly.
monitor: install ## Check the prediction log for drift, bad rows and accuracy; retrain when a threshold is crossed
	$(BIN)/python -m flows.monitor --repo .

# One offline page of the last run and the monitor's history (make run writes it too).
page: install ## Write reports/index.html (stages, champion vs challenger, data gate, drift over time)
	$(BIN)/python -m flows.page --repo .

# A bare `dvc plots show` loads vega from a CDN; this passes DVC a template with vega inlined.
plots: install ## Write the DVC plots page (reports/plots/index.html); renders offline
	$(BIN)/python -m flows.plots --repo .

clean: ## Remove generated data, reports, models and the local stores, tuning studies too (keeps .venv)
	rm -rf data/raw data/validated data/quarantine data/features models ensemble compact reports mlflow/mlflow.db* \
	  mlflow/artifacts .prefect .dvcstore .dvc/tmp/pipeline-pushed.json data/tune

# Benchmarks (bench/): ratios measured side by side in one run; results in bench/results/.
# --no-deps: only the pinned wheels in bench/requirements.txt are added (their dependencies are
# already in requirements.lock), so no pin moves and torch stays the CPU build.
bench-setup: $(BENCH_STAMP) ## Add the benchmark-only packages (Lightning) to .venv, no pin changed

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps \
	  -r bench/requirements.txt -c requirements.lock
	rm -f $(VENV)/.bench-installed-* && touch $@

bench-train: bench-setup ## Training benchmarks: stage vs bare loop vs Lightning; MLflow cost
	$(BIN)/python -m bench.train_loop
	$(BIN)/python -m bench.train_mlflow

bench-data: install ## Data stages on 1M and 10M synthetic rows vs a plain pyarrow read (~3 GB in /tmp)
	$(BIN)/python -m bench.data_scale

bench-tune: install ## Tuning: TPE vs random, epochs pruning saves, 2 workers vs 1, test table of the families
	$(BIN)/python -m bench.tune

bench-compress: install ## Compression (prune, int8, distill) vs the parent; ensembles vs their best member
	$(BIN)/python -m bench.compress

bench-feedback: install ## Edit-run loop: full/no-op make run, dvc repro after an lr change vs a plain script
	$(BIN)/python -m bench.feedback

bench-monitor: install ## Monitor cost per 100k logged predictions vs reading the log alone
	$(BIN)/python -m bench.monitor

bench-serve: install ## Serving: our service vs `mlflow models serve`, same model and load (wrk)
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -q && apt-get install -y -q wrk) >/dev/null || \
	  echo "wrk not installed: bench.serve falls back to its Python load client"
	$(BIN)/python -m bench.serve

# Lineage (flows/lineage.py, flows/reproduce.py). MODEL: <name>@<alias> or <name>/<version>;
# by default the champion of params.yaml's register.model_name (make data sets it per table).
MODEL ?= $(shell sed -n 's/^ *model_name: *\([^ #]*\).*/\1/p' params.yaml)@champion
.PHONY: lineage reproduce

lineage: install ## Trace MODEL (<register.model_name>@champion) to its data, validation, commit, params, runs
	$(BIN)/python -m flows.lineage $(MODEL)

reproduce: install ## Re-run MODEL on its exact data in a clean workspace (WORKDIR=; REMOTE=1: from the stack); compare metrics
	$(BIN)/python -m flows.reproduce $(MODEL) $(if $(WORKDIR),--workdir $(WORKDIR))$(if $(REMOTE), --stack)

# Alias history (stages/register/registry.py: every move, in the MLflow store's registry-audit
# experiment; `make lineage` shows it). MODEL: <name> or <name>@champion (default, as above).
ROLLBACK_USAGE := usage: make rollback REASON="why" [VERSION=n] [MODEL=name] [FORCE=1]
.PHONY: rollback
# REASON reaches the shell as an environment variable, never spliced into the command line:
# any quote, $ or backtick in it stays text.
rollback: export ROLLBACK_REASON = $(value REASON)
rollback: install ## Move champion back to its previous holder (or VERSION=n): make rollback REASON="why"
	@test -n "$$ROLLBACK_REASON" || { echo '$(ROLLBACK_USAGE)' >&2; exit 2; }
	$(BIN)/python -m flows.rollback $(MODEL) --reason "$$ROLLBACK_REASON"$(if $(VERSION), --version $(VERSION))$(if $(FORCE), --force)

# Data integrity (stages/common/integrity.py): every output dvc.lock records, in the workspace
# and in the DVC cache, hashed from its bytes. `make repair` rewrites a corrupt cache object from a
# good workspace copy, restores a workspace file from a good cache object, removes what has no good
# copy; then `make run` re-creates it.
# The server stack (stack/, settings in stack/stack.env): PostgreSQL, an MLflow server, a Prefect
# server with a process work pool and its worker(s), SeaweedFS as S3; the pipeline deployed to
# the pool with its cron and the monitor's retraining trigger, the monitor on monitor.cron.
# Data stays in .stack/ across `make down`/`make up`.
.PHONY: up down stack-status train-node
up: install test-deps ## Start the server stack on 127.0.0.1 and deploy the pipeline (with its retraining trigger) and the monitor to its work pool
	$(BIN)/python -m stack up
	$(BIN)/python -m flows.remote deploy --repo .

down: install ## Stop the server stack (its data stays in .stack/ for the next `make up`)
	$(BIN)/python -m stack down

stack-status: install ## Which stack services run, their URLs and logs
	$(BIN)/python -m stack status

# Training on several machines (train.nnodes > 1, train.rdzv_endpoint): the train stage runs on
# the first node; each other node joins with this (same checkout, `dvc pull` of data/features).
train-node: install ## Join this machine to a multi-node training job (train.nnodes, train.rdzv_endpoint)
	$(BIN)/python -m stages.train.node

.PHONY: verify repair
verify: install ## Check the data, models and reports against dvc.lock (workspace + DVC cache)
	$(BIN)/python -m flows.verify

repair: install ## Repair what verify finds (cache objects from good workspace copies, files from good cache objects); then make run
	$(BIN)/python -m flows.verify --repair
