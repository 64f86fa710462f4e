#!/usr/bin/env bash
# The GPU check (scripts/feather_gpu_check): one JSON object on stdout, logs
# on stderr, exit status non-zero if any check failed.
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--out FILE]
# Uses the repository's .venv when there is one, else python3.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY=python3
fi
PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m feather_gpu_check "$@"
exit $?
