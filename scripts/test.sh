#!/usr/bin/env bash
# Install what the tests need and run them (CPU only; about 20 minutes on 2 cores). The Slurm tests need a
# real Slurm: scripts/slurm_local.sh starts one on this machine (root; Debian's packages) and this script
# stops it again at the end if it started it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-test.txt
if ! sinfo -h >/dev/null 2>&1; then
    bash scripts/slurm_local.sh up
    trap 'bash scripts/slurm_local.sh down' EXIT
fi
PYTHONPATH=src python -m pytest -q tests "$@"
