# Edgeward: thin, self-documenting targets over uv. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Where scripts/bootstrap.sh installs uv when it is not on PATH (one variable for both).
EDGEWARD_UV_VENV ?= $(HOME)/.cache/edgeward/uv
export EDGEWARD_UV_VENV
export PATH := $(EDGEWARD_UV_VENV)/bin:$(PATH)

.PHONY: help bootstrap demo test lint typecheck unit integration bench bench-smoke acl clean images stack stack-down

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}'

bootstrap: ## Install system packages, uv and the locked environment (idempotent)
	@scripts/bootstrap.sh

demo: bootstrap ## Run the demo: PKI, mosquitto, TPM attestation, models, attested inference, revocation
	uv run edgeward demo

test: bootstrap lint typecheck ## Everything CI runs: lint, types, all tests with coverage
	uv run pytest --cov --cov-report=term -q

lint: bootstrap ## ruff check (banned APIs included) + format check + import contracts
	uv run ruff check .
	uv run ruff format --check .
	uv run lint-imports

typecheck: bootstrap ## mypy --strict over product code
	uv run mypy

unit: bootstrap ## Fast tests only (no broker)
	uv run pytest -q tests/unit tests/property

integration: bootstrap ## Tests against the real mosquitto and real swtpm
	uv run pytest -q -m "broker or tpm"

images: bootstrap ## Build the images (deploy/images); unchanged inputs: no rebuild. IMAGES="broker gateway" picks some
	scripts/containers.sh images $(IMAGES)

STACK_DIR ?= $(CURDIR)/run/stack
stack: bootstrap stack-down ## The whole system in containers (deploy/compose) and its smoke story; stack-down removes it
	scripts/containers.sh images
	uv run python deploy/compose/stack.py prepare --dir $(STACK_DIR)
	@started=$$(date +%s%N); \
	EDGEWARD_STACK=$(STACK_DIR) scripts/containers.sh compose up -d && \
	echo "[stack] compose up: $$(( ($$(date +%s%N) - started) / 1000000 )) ms"
	uv run python deploy/compose/stack.py smoke --dir $(STACK_DIR)

stack-down: ## Remove the stack: its containers and its state (run/stack)
	@if [ -d $(STACK_DIR) ]; then EDGEWARD_STACK=$(STACK_DIR) scripts/containers.sh compose down -t 5 >/dev/null 2>&1 || true; fi
	rm -rf $(STACK_DIR)

bench: bootstrap ## Run every bench/bench_*.py (all of them; fails at the end if any failed)
	uv run python bench/run_all.py

bench-smoke: bootstrap ## Every benchmark with tiny sizes, a few seconds each (make test runs it too)
	uv run python bench/run_all.py --smoke

acl: bootstrap ## Regenerate the committed reference ACL in mosquitto/ from the topic scheme
	uv run python -c "from edgeward_shared.broker.acl import render_acl; import sys; sys.stdout.write(render_acl())" > mosquitto/edgeward.acl

clean: ## Remove caches and run directories
	rm -rf .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis .coverage run demo-run bench/results/*.json bench/results/smoke
