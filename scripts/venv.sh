#!/bin/sh
# Create .venv (if needed) and install the project into it with the given extras.
set -eu
cd "$(dirname "$0")/.."
extras=${1:-all}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[all,$extras]"
