#!/usr/bin/env bash
# Creates .venv (or $VENV) with torch, builds cnnviz_fast and its extension in place
# (CPU kernels always; CUDA kernels too when a CUDA toolkit is found) and installs the
# test tools. Safe to re-run. CNNVIZ_REQUIRE_CUDA=1 makes a failed CUDA build fatal
# (CI); otherwise it falls back to a CPU-only build with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

# torch 2.14.1 / torchvision 0.29.1 (CUDA 13.0 builds; torchvision only for test anchors).
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" setuptools wheel ninja
"${PIP[@]}" numpy pillow tqdm scikit-learn matplotlib opencv-python-headless \
    pytest captum grad-cam expecttest openTSNE faiss-cpu scikit-image
# Quantus (benchmark anchor for the faithfulness metrics) without its opencv-python pin
"${PIP[@]}" pandas cachetools && "${PIP[@]}" --no-deps quantus

if ! bash scripts/build_extension.sh "$PY"; then
    if [ "${CNNVIZ_REQUIRE_CUDA:-0}" = "1" ]; then
        echo "setup: the CUDA build failed (CNNVIZ_REQUIRE_CUDA=1)" >&2; exit 1
    fi
    echo "setup: WARNING: the CUDA build failed; building the CPU kernels only" >&2
    CPU_ONLY=1 bash scripts/build_extension.sh "$PY"
fi
"$PY" -m cnnviz_fast info
