#!/usr/bin/env bash
# Make sure uv and the project's virtualenv exist; print the uv command to use.
# Used by the Makefile and .ci/run so a fresh machine needs nothing installed by hand.
#
#   bootstrap.sh          the venv with every extra and the dev tools (tests, checks, bench)
#   bootstrap.sh --demo   the venv with what `immagent` itself needs, nothing more; packages
#                         already installed stay (a dev venv is not stripped by `make demo`)
#   bootstrap.sh --uv     only find (or install) uv
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
case "${1:-}" in
  --uv) ;;
  --demo) $UV sync --quiet --no-dev --inexact >&2 ;;
  "") $UV sync --quiet --all-extras >&2 ;;
  *) echo "bootstrap.sh: unknown option $1" >&2; exit 2 ;;
esac
echo "$UV"
