# Every target bootstraps uv and the venv itself, so `make demo` and `make test` work on a
# fresh machine. LiteLLM must never reach the network on import.
SHELL := /bin/bash
export UV_SYSTEM_CERTS := 1
export UV_PYTHON_DOWNLOADS := never
export LITELLM_LOCAL_MODEL_COST_MAP := True
UV := $(shell bash scripts/bootstrap.sh --uv)
RUN = $(UV) run --no-sync

.PHONY: dev venv fmt lint typecheck check test test-cov bench bench-full bench-scale \
        bench-scale-full bench-reliability demo pg cluster stop clean test-agents-range \
        peer-agents peer-pydantic-ai peer-pydantic-ai-check test-pydantic-ai-range \
        peer-langgraph peer-langgraph-conformance peer-langgraph-store test-install bench-install

dev:            ## install the venv with every extra and dev tool
	@bash scripts/bootstrap.sh >/dev/null && echo "venv ready: .venv"

venv:           # every target below but demo, stop and clean needs the full venv
	@bash scripts/bootstrap.sh >/dev/null

demo:           ## the main job: two chat turns on the embedded SQLite default, then the log
	@bash scripts/bootstrap.sh --demo >/dev/null
	@$(RUN) immagent --db demo.db chat "Hello!"
	@$(RUN) immagent --db demo.db chat "What can you do?"
	@$(RUN) immagent --db demo.db log --name assistant

fmt: venv
	$(RUN) ruff format immagent tests benchmarks examples
	$(RUN) ruff check --fix immagent tests benchmarks examples

lint: venv
	$(RUN) ruff check immagent tests benchmarks examples scripts

typecheck: venv
	$(RUN) mypy

check: lint typecheck

pg:             ## start (or find) the throwaway PostgreSQL used by tests and benchmarks
	@bash scripts/ensure-postgres.sh

cluster:        ## start (or find) the primary + hot standby + PgBouncer of the scale-out tests
	@bash scripts/pg-cluster.sh up

test: venv      ## the whole suite against real PostgreSQL (started here) and SQLite
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  $(RUN) pytest

test-agents-range: ## the session tests on the oldest and newest openai-agents claimed (fresh venvs)
	@bash scripts/agents-range.sh

peer-agents:    ## the Agents SDK's own memory tests against ImmAgentSession, beside its sessions
	@bash scripts/peer-agents.sh

peer-langgraph: venv ## LangGraph's own graph tests with ImmAgentSaver beside its savers (~1 h; weekly and before a release)
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  $(RUN) python scripts/peer_langgraph.py graph $(if $(LANGGRAPH_SRC),--src $(LANGGRAPH_SRC))

peer-langgraph-conformance: venv ## LangGraph's checkpoint conformance suite from its main branch (minutes)
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  $(RUN) python scripts/peer_langgraph.py conformance $(if $(LANGGRAPH_SRC),--src $(LANGGRAPH_SRC))

test-cov: venv
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  $(RUN) pytest --cov=immagent --cov-report=term-missing

test-install: venv ## each install flavour in a fresh venv from this checkout's wheels (CI runs it)
	@$(RUN) python scripts/install_flavours.py check --uv "$(UV)"

bench: venv     ## quick benchmarks (tables); `make bench-full` for the full sizes
	@$(RUN) python -m benchmarks.run --dsn "$$(bash scripts/ensure-postgres.sh)"
	@$(RUN) python -m benchmarks.cli_latency --runs 5

bench-full: venv
	@$(RUN) python -m benchmarks.run --full --dsn "$$(bash scripts/ensure-postgres.sh)" \
	  --json bench-results.json --plot benchmarks/storage-growth.png
	@$(RUN) python -m benchmarks.cli_latency --runs 10 --litellm --json bench-cli.json

bench-reliability: venv ## gc/verify at 80,000 refs, delete_lineage at 100,001 states, 15,000 steps in one process
	@$(RUN) python -m benchmarks.reliability --full --dsn "$$(bash scripts/ensure-postgres.sh)" \
	  --json bench-reliability.json

bench-install: venv ## packages, size and import time of each install flavour (the README's table)
	@$(RUN) python scripts/install_flavours.py measure --uv "$(UV)"

bench-scale: venv  ## read replicas and PgBouncer on the local cluster (`bench-scale-full`: full sizes)
	@$(RUN) python -m benchmarks.scale

bench-scale-full: venv
	@$(RUN) python -m benchmarks.scale --full --json bench-scale-results.json

test-pydantic-ai-range: venv ## tests/test_pydantic_ai.py on the oldest and newest pydantic-ai the extra allows
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  for v in 2.71.0 2.78.0; do echo "== pydantic-ai-slim $$v"; \
	    $(UV) run --no-sync --with pydantic-ai-slim==$$v --with pydantic-graph==$$v \
	      pytest tests/test_pydantic_ai.py -q -p no:cacheprovider || exit 1; done

peer-pydantic-ai: venv ## pydantic-ai's own conversation-store tests on ours, beside its in-memory store
	@$(RUN) python scripts/peer_pydantic_ai.py $(if $(PYDANTIC_AI_SRC),--src $(PYDANTIC_AI_SRC))

peer-pydantic-ai-check: venv ## the same machinery on a stand-in test file (no pydantic-ai checkout)
	@$(RUN) python scripts/peer_pydantic_ai.py --self-check

peer-langgraph-store: venv ## LangGraph's own store tests on ImmAgentStore beside its stores (LANGGRAPH_REPO=clone)
	@$(RUN) python scripts/peer_langgraph_store.py --repo "$${LANGGRAPH_REPO:?set LANGGRAPH_REPO to a clone of github.com/langchain-ai/langgraph}" \
	  --dsn "$$(bash scripts/ensure-postgres.sh)" --json peer-langgraph-store.json

stop:           ## stop what `make test` and `make cluster` started from this checkout
	@bash scripts/pg-cluster.sh down 2>/dev/null || true
	@bash scripts/ensure-postgres.sh stop

clean: stop     ## stop the servers, then remove the venv, caches and the demo database
	rm -rf .venv .venv-agents .peer .peer-agents .mypy_cache .ruff_cache .pytest_cache demo.db*
