#!/usr/bin/env bash
# Run the OpenAI Agents SDK's own memory tests (its tests/memory and tests/extensions/memory)
# against ImmAgentSession beside the SDK's sessions (tests/peers/openai_agents_peer.py).
#
# The tests are those of the SDK version installed in the project venv (the locked one),
# taken from that release's source distribution on PyPI (`pip download --no-binary`; it
# carries the repository's tests/), or from a checkout of the SDK's repository at that
# version's tag given as $PEER_AGENTS_SRC. They are unpacked under .peer-agents/ and never
# copied into this repository. The SDK's test-only dependencies are installed into the
# project venv. Extra arguments go to pytest (e.g. -k, -x). The summary line is the count.
#
# A hung test cannot stop the run: the tests run in a pytest-xdist worker process
# ($PEER_WORKERS, default 1: the machine may be shared) under pytest-timeout's thread
# method, so a test that outlives $PEER_TIMEOUT seconds (setup, call and teardown; a
# teardown can hang joining a worker thread the test left blocked) has its stacks dumped
# and its worker ended; xdist reports it failed and carries on in a new worker.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never LITELLM_LOCAL_MODEL_COST_MAP=True
UV="$(bash scripts/bootstrap.sh)"
root="$PWD"
version="$($UV run --no-sync python -c 'import agents; print(agents.__version__)')"
work="$root/.peer-agents/$version"
if [[ -n "${PEER_AGENTS_SRC:-}" ]]; then
  src="$PEER_AGENTS_SRC"
else
  src="$work/openai_agents-$version"
  if [[ ! -d "$src/tests" ]]; then
    mkdir -p "$work"
    $UV run --no-sync --with pip python -m pip download --quiet --no-deps \
      --no-binary :all: --dest "$work" "openai-agents==$version"
    tar -xzf "$work/openai_agents-$version.tar.gz" -C "$work"
  fi
fi
echo "== the Agents SDK $version's memory tests, from $src"
# What those tests import beyond the SDK itself (its dev dependency group, the part used here).
$UV pip install --quiet pytest-mock inline-snapshot aiosqlite "cryptography>=45" "sqlalchemy[asyncio]" pytest-timeout pytest-xdist
modules=(
  tests/memory/test_session.py
  tests/memory/test_session_limit.py
  tests/memory/test_compaction_suffix.py
  tests/memory/test_compaction_model_visibility.py
  tests/memory/test_openai_responses_compaction_session.py
  tests/memory/test_session_pending_async_calls.py
  tests/extensions/memory/test_async_sqlite_session.py
  tests/extensions/memory/test_advanced_sqlite_session.py
  tests/extensions/memory/test_encrypt_session.py
)
# Left out: the three tests that fork processes to contend for the SDK's SQLite file
# (test_*_across_processes, test_concurrent_structure_table_claims_*): they hang or fail
# for the SDK's own session in this sandbox (its forkserver), and they test that
# backend's file locking and table layout, not the protocol.
cd "$src"
PYTHONPATH="$root/tests/peers:$src${PYTHONPATH:+:$PYTHONPATH}" \
  "$root/.venv/bin/python" -m pytest -p openai_agents_peer -p no:cacheprovider -q \
  -o addopts="" -n "${PEER_WORKERS:-1}" --max-worker-restart 50 \
  --timeout "${PEER_TIMEOUT:-300}" --timeout-method thread -rs \
  -k "not across_processes and not concurrent_structure_table_claims" \
  "${modules[@]}" "$@"
