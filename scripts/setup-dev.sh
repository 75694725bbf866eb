#!/usr/bin/env bash
# Set up a development environment in .venv: the runtime, the export stage
# (torch CPU build), the test tools, and the CLIP tokenizer files the tokenizer
# parity tests need (made from the open-clip-torch wheel on PyPI; not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,serve,test]"
# The GenAI peer of `cpuflow bench --reference genai` (tests/test_bench_peers.py): the release made for the
# openvino just installed (each pins its openvino exactly; an unpinned one could move openvino).
OV=$(python -c "import importlib.metadata as m; print('.'.join(m.version('openvino').split('.')[:3]))")
python -m pip install -q "openvino-genai==$OV.*" "openvino-tokenizers==$OV.*" \
    || echo "note: no openvino-genai $OV: the GenAI bench tests will skip"
# The watermark compatibility tests' reference (imwatermark): without its opencv-python
# requirement (the GUI build, needs libGL); the test extra brings opencv-python-headless.
python -m pip install -q --no-deps "invisible-watermark==0.2.0"
if [ -f scripts/fetch_clip_vocab.sh ] && [ ! -f .cache/clip-tokenizers/sd2/vocab.json ]; then
    bash scripts/fetch_clip_vocab.sh .cache/clip-tokenizers
fi
# Headless Chromium for the browser test (Debian packages; needs root).
if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; then
    bash scripts/install-browser.sh
else
    echo "note: not root: the browser test will skip (run scripts/install-browser.sh as root)"
fi
echo "set up: . .venv/bin/activate"
