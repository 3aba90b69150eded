#!/usr/bin/env bash
# Run the Agents SDK session tests against the oldest and the newest openai-agents release
# the `openai-agents` extra claims, each in a fresh virtualenv (the default `make test` uses
# the locked one). Usage: scripts/agents-range.sh [VERSION ...]  (default: both ends).
# Needs the package registry (the venvs install from it) and PostgreSQL (as `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never LITELLM_LOCAL_MODEL_COST_MAP=True
UV="$(bash scripts/bootstrap.sh)"
# The two ends of `openai-agents>=0.24,<0.26` in pyproject.toml.
versions=("${@:-0.24.0 0.25.0}")
read -r -a versions <<<"${versions[*]}"
export IMMAGENT_TEST_DSN="${IMMAGENT_TEST_DSN:-$(bash scripts/ensure-postgres.sh)}"
root=".venv-agents"
for version in "${versions[@]}"; do
  venv="$root/$version"
  echo "== openai-agents $version (fresh venv $venv)"
  rm -rf "$venv"
  $UV venv --quiet --python-preference only-system "$venv"
  # The project with its extra, the SDK pinned, and the test tools the session tests use.
  VIRTUAL_ENV="$venv" $UV pip install --quiet -e ".[openai-agents]" \
    "openai-agents==$version" pytest pytest-asyncio hypothesis
  "$venv/bin/python" -c "import agents, sys; assert agents.__version__ == sys.argv[1], agents.__version__" "$version"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_openai_session.py tests/test_openai_session_history.py \
    tests/test_openai_session_sdk.py
done
