#!/usr/bin/env bash
# Builds cnnviz_fast._C with CPU + CUDA kernels (editable install), on machines with or
# without a GPU. Usage: scripts/build_extension.sh [python]   (default: /work/venv/bin/python,
# else python3). Override CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS in the environment;
# CPU_ONLY=1 skips the CUDA kernels; INPLACE=1 rebuilds incrementally with
# `setup.py build_ext --inplace` in build/ext-{cuda,cpu} (for an already installed checkout)
# instead of `pip install --no-build-isolation -e .` (which recompiles everything).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-}}"
if [[ -z "${PY}" ]]; then
  if [[ -x /work/venv/bin/python ]]; then PY=/work/venv/bin/python; else PY=python3; fi
fi
SITE="$("${PY}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

export MAX_JOBS="${MAX_JOBS:-2}"
if [[ "${CPU_ONLY:-0}" != "1" ]]; then
  # nvcc on PATH may be a wrapper: point at the real toolkit (torch's own guess fails to link)
  if [[ -z "${CUDA_HOME:-}" ]]; then
    for d in /usr/local/cuda-13.0 /usr/local/cuda; do
      if [[ -x "$d/bin/nvcc" ]]; then export CUDA_HOME="$d"; break; fi
    done
  fi
  # torch's CUDA headers include cuBLAS/cuSPARSE headers shipped in the nvidia-* wheels
  if [[ -d "${SITE}/nvidia/cu13/include" ]]; then
    export CPATH="${SITE}/nvidia/cu13/include${CPATH:+:${CPATH}}"
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  export FORCE_CUDA=1
  echo "build_extension: CUDA_HOME=${CUDA_HOME:-<unset>} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS}"
else
  export FORCE_CUDA=0
  unset TORCH_CUDA_ARCH_LIST
  echo "build_extension: CPU only, MAX_JOBS=${MAX_JOBS}"
fi

if [[ "${INPLACE:-0}" == "1" ]]; then
  "${PY}" setup.py build_ext --inplace --build-temp "build/ext-$([[ "${FORCE_CUDA}" == 1 ]] && echo cuda || echo cpu)"
else
  "${PY}" -m pip install --no-build-isolation --no-deps -e .
fi
"${PY}" -c "import cnnviz_fast._C, torch; print('cnnviz_fast._C loaded:', torch.ops.cnnviz.occlude)"
