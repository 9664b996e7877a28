#!/usr/bin/env bash
# The GPU user's install, proven on a machine without a GPU: build bert_emd._C with its CUDA
# kernels for sm_80 and sm_90 against the CUDA 13.0 build of torch (default 2.14.1) in a second
# virtual environment, from a clean copy of the tracked sources, import it, and check that the
# shared library holds machine code for both architectures. Then, with that build (the path a GPU
# user's process takes), run whole training steps on fake CUDA tensors and fail on any host sync
# (tests/ops/test_no_host_sync.py: a CPU-only torch cannot record autograd over CUDA tensors).
#   usage: scripts/cuda_build_check.sh [VENV_DIR] [TORCH_SPEC]
set -euo pipefail
venv=$(realpath -m "${1:-.venv-cuda}")
torch_spec=${2:-torch==2.14.1}
python=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
command -v nvcc >/dev/null || { echo "cuda_build_check: no nvcc under $CUDA_HOME: skipped"; exit 0; }

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "$torch_spec" "triton>=3.8,<3.9" ninja "setuptools>=64" wheel numpy

src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$src"
start=$(date +%s)
(cd "$src" && TORCH_CUDA_ARCH_LIST="8.0;9.0" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps .)
echo "cuda_build_check: built in $(( $(date +%s) - start )) s"

cd /
"$venv/bin/python" - <<'PY'
import bert_emd, bert_emd._ext as e, torch
assert e.has_extension(), e.extension_error()
assert e.built_with_cuda(), f"built without CUDA: {e.build_info()}"
assert torch._C._dispatch_has_kernel_for_dispatch_key("bert_emd::emd_exact", "CUDA")
print(f"cuda_build_check: torch {torch.__version__}, bert_emd._C {e.build_info()}")
PY
so=$("$venv/bin/python" -c "import bert_emd._C as c; print(c.__file__)")
cuobjdump=$(ls "$venv"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)
[ -n "$cuobjdump" ] || cuobjdump=$(command -v cuobjdump || true)
if [ -n "$cuobjdump" ]; then
  archs=$("$cuobjdump" --list-elf "$so" | grep -o "sm_[0-9]*" | sort -u | tr '\n' ' ')
  echo "cuda_build_check: machine code for: $archs"
  for arch in sm_80 sm_90; do
    grep -q "$arch" <<<"$archs" || { echo "cuda_build_check: no $arch code in $so"; exit 1; }
  done
fi

echo "cuda_build_check: training steps on fake CUDA tensors, no host sync"
"$venv/bin/python" -m pip install --quiet "pytest>=8" "transformers>=4.40" "accelerate>=0.30"
# from the source copy, whose python/ is not on the path: bert_emd is the build installed above
(cd "$src" && "$venv/bin/python" -m pytest -q -o addopts="" -p no:cacheprovider tests/ops/test_no_host_sync.py)
echo "cuda_build_check: OK"
