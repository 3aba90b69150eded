# Every target bootstraps uv and the venv itself, so `make demo` and `make test` work on a
# fresh machine. LiteLLM must never reach the network on import.
SHELL := /bin/bash
export UV_SYSTEM_CERTS := 1
export UV_PYTHON_DOWNLOADS := never
export LITELLM_LOCAL_MODEL_COST_MAP := True
UV := $(shell bash scripts/bootstrap.sh)
RUN = $(UV) run --no-sync

.PHONY: dev fmt lint typecheck check test test-cov bench bench-full bench-scale bench-scale-full \
        demo pg cluster clean test-agents-range peer-agents peer-pydantic-ai \
        peer-pydantic-ai-check test-pydantic-ai-range test-install bench-install

dev:            ## install the venv with every extra and dev tool
	@bash scripts/bootstrap.sh >/dev/null && echo "venv ready: .venv"

demo:           ## the main job: two chat turns on the embedded SQLite default, then the log
	@$(RUN) immagent --db demo.db chat "Hello!"
	@$(RUN) immagent --db demo.db chat "What can you do?"
	@$(RUN) immagent --db demo.db log --name assistant

fmt:
	$(RUN) ruff format immagent tests benchmarks examples
	$(RUN) ruff check --fix immagent tests benchmarks examples

lint:
	$(RUN) ruff check immagent tests benchmarks examples scripts

typecheck:
	$(RUN) mypy

check: lint typecheck

pg:             ## start (or find) the throwaway PostgreSQL used by tests and benchmarks
	@bash scripts/ensure-postgres.sh

cluster:        ## start (or find) the primary + hot standby + PgBouncer of the scale-out tests
	@bash scripts/pg-cluster.sh up

test:           ## the whole suite against real PostgreSQL (started here) and SQLite
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  $(RUN) pytest

test-agents-range: ## the session tests on the oldest and newest openai-agents claimed (fresh venvs)
	@bash scripts/agents-range.sh

peer-agents:    ## the Agents SDK's own memory tests against ImmAgentSession, beside its sessions
	@bash scripts/peer-agents.sh

test-cov:
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  $(RUN) pytest --cov=immagent --cov-report=term-missing

test-install:   ## each install flavour in a fresh venv from this checkout's wheels (CI runs it)
	@$(RUN) python scripts/install_flavours.py check --uv "$(UV)"

bench:          ## quick benchmarks (tables); `make bench-full` for the full sizes
	@$(RUN) python -m benchmarks.run --dsn "$$(bash scripts/ensure-postgres.sh)"
	@$(RUN) python -m benchmarks.cli_latency --runs 5

bench-full:
	@$(RUN) python -m benchmarks.run --full --dsn "$$(bash scripts/ensure-postgres.sh)" \
	  --json bench-results.json --plot benchmarks/storage-growth.png
	@$(RUN) python -m benchmarks.cli_latency --runs 10 --litellm --json bench-cli.json

bench-install:  ## packages, size and import time of each install flavour (the README's table)
	@$(RUN) python scripts/install_flavours.py measure --uv "$(UV)"

bench-scale:    ## read replicas and PgBouncer on the local cluster (`bench-scale-full`: full sizes)
	@$(RUN) python -m benchmarks.scale

bench-scale-full:
	@$(RUN) python -m benchmarks.scale --full --json bench-scale-results.json

test-pydantic-ai-range: ## tests/test_pydantic_ai.py on the oldest and newest pydantic-ai the extra allows
	@export IMMAGENT_TEST_DSN="$${IMMAGENT_TEST_DSN:-$$(bash scripts/ensure-postgres.sh)}" && \
	  for v in 2.71.0 2.78.0; do echo "== pydantic-ai-slim $$v"; \
	    $(UV) run --no-sync --with pydantic-ai-slim==$$v --with pydantic-graph==$$v \
	      pytest tests/test_pydantic_ai.py -q -p no:cacheprovider || exit 1; done

peer-pydantic-ai: ## pydantic-ai's own conversation-store tests on ours, beside its in-memory store
	@$(RUN) python scripts/peer_pydantic_ai.py $(if $(PYDANTIC_AI_SRC),--src $(PYDANTIC_AI_SRC))

peer-pydantic-ai-check: ## the same machinery on a stand-in test file (no pydantic-ai checkout)
	@$(RUN) python scripts/peer_pydantic_ai.py --self-check

clean:
	rm -rf .venv .venv-agents .peer-agents .mypy_cache .ruff_cache .pytest_cache demo.db*
