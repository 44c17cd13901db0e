#!/bin/sh
# Create .venv (if needed) and install the project into it with the given extras
# (comma-separated: speed for the demo; all,test for the test suite).
set -eu
cd "$(dirname "$0")/.."
extras=${1:-speed}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[$extras]"
