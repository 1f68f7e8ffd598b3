#!/usr/bin/env bash
# Fetch here, into .whl/, the wheels bench/device_check.sh needs on a lent GPU machine (faiss-cpu,
# the service's web stack), then check them. Options: see `bash bench/device_wheels.sh --help`.
# Needs the project's venv (its installed versions are the ones fetched) and PyPI.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3
fi
exec "$PY" "$REPO/bench/device_wheels.py" "$@"
