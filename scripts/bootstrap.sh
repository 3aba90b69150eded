#!/usr/bin/env bash
# Make sure uv and the project's virtualenv exist; print the uv command to use.
# Used by the Makefile and .ci/run so a fresh machine needs nothing installed by hand.
set -euo pipefail
export UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never
if command -v uv >/dev/null 2>&1; then
  UV=uv
elif python3 -m uv --version >/dev/null 2>&1; then
  UV="python3 -m uv"
else
  python3 -m pip install --quiet --disable-pip-version-check uv >&2
  UV="python3 -m uv"
fi
$UV sync --quiet --all-extras >&2
echo "$UV"
