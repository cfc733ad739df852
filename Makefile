# group-worker: `make help` lists the targets. CI (.ci/run) calls the same ones.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KAFKA := deploy/local-kafka/kafka.sh
# The test suite gets a broker of its own, so it never touches the one `make run` uses.
TEST_KAFKA_PORT ?= 19092
PYTEST_ARGS ?=
# What run, test, deploy-check and bench need of this machine (python3, java, mvn,
# prometheus, go...): checked first, one line naming what is missing (deploy/prereqs.sh).
PREREQS := PYTHON='$(PYTHON)' VENV='$(VENV)' bash deploy/prereqs.sh

.PHONY: help venv lock kafka-up kafka-down kafka-status run topics test test-unit lint typecheck check

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

.PHONY: prereqs-run prereqs-test prereqs-deploy-check prereqs-bench
prereqs-run prereqs-test prereqs-deploy-check prereqs-bench:
	@$(PREREQS) $(@:prereqs-%=%)

# Every dependency comes from a lock (requirements/, made by `make lock`): exact versions
# with their hashes, then the package itself without resolving anything.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

venv: $(VENV)/.installed ## create .venv with the worker and its dev tools

$(VENV)/.installed: pyproject.toml requirements/dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --require-hashes -r requirements/dev.txt
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	@$(BIN)/pip check >/dev/null || { $(BIN)/pip check; \
	  echo "requirements/dev.txt does not meet pyproject.toml: run make lock"; exit 1; }
	@touch $@

# `make lock` re-pins requirements/*.txt from pyproject.toml, keeping the versions already
# pinned unless pyproject.toml excludes them; `make lock LOCK_ARGS=--upgrade` takes the
# newest. dev.txt is resolved first and constrains the others, so the image (runtime.txt)
# runs exactly the versions the tests ran with. --universal: one lock for every platform
# and Python 3.11+.
UV_VERSION := 0.13.8
UV := .cache/uv-$(UV_VERSION)/bin/uv
LOCK_ARGS ?=
UV_COMPILE = $(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_ARGS)
BUILD_REQUIRES := $(PYTHON) -c 'import tomllib; \
	print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

$(UV):
	$(PYTHON) -m venv .cache/uv-$(UV_VERSION)
	.cache/uv-$(UV_VERSION)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

lock: $(UV) ## re-pin requirements/*.txt (versions and hashes) from pyproject.toml
	@mkdir -p requirements
	$(BUILD_REQUIRES) | $(UV_COMPILE) --extra dev pyproject.toml - -o requirements/dev.txt
	$(UV_COMPILE) -c requirements/dev.txt pyproject.toml -o requirements/runtime.txt
	$(BUILD_REQUIRES) | $(UV_COMPILE) -c requirements/dev.txt - -o requirements/build.txt
	$(BUILD_REQUIRES) | $(UV_COMPILE) -c requirements/dev.txt --extra dev --extra bench \
		pyproject.toml - -o requirements/bench.txt
	$(UV_COMPILE) requirements/peer.in -o requirements/peer.txt

kafka-up: ## start the local Kafka broker on 127.0.0.1:9092, or KAFKA_PORT (fetches the jars once)
	@bash $(KAFKA) up

kafka-down: ## stop the local Kafka broker
	@bash $(KAFKA) down

kafka-status: ## say whether the local Kafka broker runs
	@bash $(KAFKA) status

run: prereqs-run venv kafka-up ## set up, start Kafka, run the worker in the foreground (Ctrl-C stops it)
	GROUP_WORKER_WORKER_STATE_DIR="$${GROUP_WORKER_WORKER_STATE_DIR:-.cache/state}" $(BIN)/group-worker run

topics: venv kafka-up ## create the worker's topics and check their layout
	$(BIN)/group-worker topics create

test: prereqs-test venv ## set up, start a test broker, run every test, stop the broker it started
	@bash deploy/tools.sh prometheus
	@started=0; \
	if ! KAFKA_PORT=$(TEST_KAFKA_PORT) bash $(KAFKA) status >/dev/null; then \
	  KAFKA_PORT=$(TEST_KAFKA_PORT) bash $(KAFKA) up || exit 1; started=1; fi; \
	KAFKA_TEST_BOOTSTRAP=127.0.0.1:$(TEST_KAFKA_PORT) $(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then KAFKA_PORT=$(TEST_KAFKA_PORT) bash $(KAFKA) down; fi; \
	exit $$rc

test-unit: venv ## run the unit tests only (no broker)
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

lint: venv ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv ## mypy --strict on worker/ and tests/
	$(BIN)/mypy

check: lint typecheck test ## lint, types and every test (CI also runs deploy-check)

# Benchmark (bench/; never part of `make test`): a broker of its own on BENCH_KAFKA_PORT,
# stopped afterwards if the benchmark started it. BENCH_ARGS adds `python -m bench` flags.
BENCH_KAFKA_PORT ?= 39092
BENCH_ARGS ?=
BENCH_QUICK := --calls 100000 --restore-groups 100000 --memory-groups 20000 \
	--hot-path-calls 100000 --latency-seconds 15 --restart-groups 100000 --restart-calls 20000 \
	--keyed --name quick

.PHONY: bench bench-quick

$(VENV)/.bench-installed: $(VENV)/.installed requirements/bench.txt
	$(PIP_INSTALL) --require-hashes -r requirements/bench.txt
	@touch $@

# The peer (bench/peer.py, Quix Streams) gets a venv of its own: Quix Streams pins
# confluent-kafka below the version the worker is locked to (requirements/peer.in).
PEER_VENV := .cache/peer-quixstreams
$(PEER_VENV)/.installed: requirements/peer.txt
	@test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes \
		-r requirements/peer.txt
	@touch $@

define bench_run
	@started=0; \
	if ! KAFKA_PORT=$(BENCH_KAFKA_PORT) bash $(KAFKA) status >/dev/null; then \
	  KAFKA_PORT=$(BENCH_KAFKA_PORT) bash $(KAFKA) up || exit 1; started=1; fi; \
	$(BIN)/python -m bench --bootstrap 127.0.0.1:$(BENCH_KAFKA_PORT) \
	  --peer-python $(PEER_VENV)/bin/python $(1) $(BENCH_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then KAFKA_PORT=$(BENCH_KAFKA_PORT) bash $(KAFKA) down; fi; \
	exit $$rc
endef

bench: prereqs-bench venv $(VENV)/.bench-installed $(PEER_VENV)/.installed ## benchmark 1,000,000 calls on a broker of its own (~15 min)
	$(call bench_run,--keyed)

bench-quick: prereqs-bench venv $(VENV)/.bench-installed $(PEER_VENV)/.installed ## the benchmark at 100,000 calls (~2 min): bench/results/quick.*
	$(call bench_run,$(BENCH_QUICK))

# Deployment artefacts (deploy/): container, compose, Kubernetes, dashboard, alerts.
.PHONY: deploy-tools deploy-check

deploy-tools: prereqs-deploy-check venv ## install promtool, kustomize, hadolint, validators, CRDs (idempotent)
	bash deploy/tools.sh all

deploy-check: prereqs-deploy-check venv ## render and validate everything under deploy/ with real tools
	bash deploy/check.sh
