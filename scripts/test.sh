#!/usr/bin/env bash
# Install what the tests need and run them (CPU only; about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-test.txt
PYTHONPATH=src python -m pytest -q tests "$@"
