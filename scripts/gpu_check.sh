#!/usr/bin/env bash
# GPU checks on a machine with a CUDA GPU (used on lent GPU machines; results are recorded in
# benchmarks/RESULTS.md with the device named). Builds the extension in place with CUDA kernels
# for the local GPU, runs the GPU-only tests (real Triton, not the interpreter), then the
# benchmarks on the GPU. Writes logs and CSVs to $OUT (default ./gpu-out).
#   usage: scripts/gpu_check.sh [--quick] [bench ...]   (bench names: emd costs sinkhorn attention)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
quick=""
if [ "${1:-}" = "--quick" ]; then quick="--quick"; shift; fi
benches=${*:-emd costs sinkhorn}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
py=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # baselines carried as wheels (POT, pyemd)
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"
cap=$($py -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
start=$(date +%s)
TORCH_CUDA_ARCH_LIST="$cap" FORCE_CUDA=1 MAX_JOBS=$(nproc) $py setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
$py -m bert_emd.cli info 2>&1 | tee "$OUT/info.txt"
# GPU-only tests: real Triton on CUDA tensors (TRITON_INTERPRET=0 overrides tests/conftest.py),
# tests/test_triton_device.py among them (the three Triton ops against the references; cold Triton
# compiles of its ~55 kernel variants dominate). TESTS=tests/test_triton_device.py runs it alone.
timeout 600 $py -m pytest -q -m cuda -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
for b in $benches; do
  echo "== bench $b"
  timeout 240 $py -m bert_emd.cli bench "$b" $quick --device cuda --out-dir "$OUT" 2>&1 | tee "$OUT/bench_$b.log" | tail -40
done
echo "total: $(( $(date +%s) - start )) s"
