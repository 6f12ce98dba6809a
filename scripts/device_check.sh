#!/usr/bin/env bash
# The GPU check, in one call of a lent GPU machine whose image has torch but not our
# test-only packages: builds cnnviz_fast._C there (for the GPU it has), runs every CUDA test,
# then every benchmark with --device cuda. Each step has its own time limit and its log;
# after each step the logs and the results so far are packed into $OUT/results.tgz, so a
# cut-off run still returns what it did. The built extension is copied to $OUT so that a
# second call can carry it back instead of building again.
#
#   OUT=<folder> bash scripts/device_check.sh [step,step,...]     (default: every step)
#   steps: build tests ops attribution occlusion incremental metrics synthesis overhead profile
#          pipeline nvjpeg gpupaths decode pipeline-bf16 bf16-accuracy
#   (issue 21: gpupaths = the CUDA tests of the sync-free checks, the CUDA-graph Explainer and
#    the device decoders; decode = the pipeline with TorchCodec's batched nvJPEG; pipeline-bf16 =
#    the pipeline's GPU defaults against a bare bf16 forward + backward; bf16-accuracy =
#    occlusion of ResNet-50 in bf16 and the defaults' error against float32; the overhead and
#    synthesis steps now include the sync-free, cuda_graph and bf16 rows)
#
# Packages the image lacks travel in .devsite (made here by scripts/device_site.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-check}"
STEPS="${1:-build,gpupaths,tests,ops,attribution,occlusion,incremental,metrics,synthesis,overhead,profile,pipeline,nvjpeg,decode,pipeline-bf16,bf16-accuracy}"
WORK=/tmp/device-check-work
mkdir -p "$OUT" "$WORK/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devsite${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"

save() {
  (cd benchmarks/results && ls *nvidia* 2>/dev/null | tar czf "$WORK/results.tgz" -T - 2>/dev/null)
  tar czf "$OUT/results.tgz" -C "$WORK" logs $(cd "$WORK" && ls results.tgz junit.xml 2>/dev/null)
}

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  echo "=== $name (limit ${limit} s) at $(date +%T)"
  local start=$SECONDS
  timeout "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/logs/$name.log" 2>&1  # bash -c: steps may be functions
  echo "=== $name: exit $? after $((SECONDS - start)) s"
  grep -E "PASS|MISS|passed|failed|error|Error|skipped" "$WORK/logs/$name.log" | tail -n 30
  save
}

build() {
  if ls cnnviz_fast/_C*.so >/dev/null 2>&1; then echo "carried extension: $(ls cnnviz_fast/_C*.so)"; return 0; fi
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" INPLACE=1 bash scripts/build_extension.sh "$PY" &&
    cp cnnviz_fast/_C*.so "$OUT/"
}

bench() { cd benchmarks && "$PY" "$@" --device cuda; }
export -f build bench
export OUT PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))"
step build 240 build
step gpupaths 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu_paths.py tests/test_pipeline_decoders.py
step tests 200 "$PY" -m pytest -q -p no:cacheprovider -n 8 --continue-on-collection-errors -k "cuda or gpu" \
  --junitxml="$WORK/junit.xml" tests
step ops 90 bench bench_ops.py
step attribution 90 bench bench_attribution.py
step occlusion 90 bench bench_occlusion.py
step incremental 200 bench bench_incremental.py --models resnet18,vgg16,mobilenet,efficientnet
step metrics 120 bench bench_metrics.py
step synthesis 120 bench bench_synthesis.py
step overhead 90 bench bench_overhead.py
step profile 60 "$PY" benchmarks/profile_call_overhead.py cuda
step pipeline 120 bench bench_pipeline.py --only throughput --images 2048 --resnet-images 1024 \
  --batch-size 128 --num-workers 8 --rounds 2
step nvjpeg 90 bench bench_pipeline.py --only throughput --images 1024 --resnet-images 1024 \
  --batch-size 128 --num-workers 8 --rounds 1 --decode gpu
step decode 120 bench bench_pipeline.py --only throughput --images 1024 --resnet-images 1024 \
  --batch-size 128 --num-workers 8 --rounds 1 --decode torchcodec
step pipeline-bf16 120 bench bench_pipeline.py --only throughput --images 1024 --resnet-images 1024 \
  --batch-size 128 --num-workers 8 --rounds 1 --decode auto --dtype bf16
step bf16-accuracy 120 bench bench_gpu_paths.py
echo "=== done at $(date +%T)"
