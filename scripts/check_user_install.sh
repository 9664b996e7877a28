#!/usr/bin/env bash
# The user's install, proven: build an sdist and a wheel the way PyPI users get them, install
# each with plain pip (no flags) into a fresh venv that already holds the user's torch, and run
# the README's drop-in snippets there.
#
#   venv "wheel": torch + bert-emd[hf] from the wheel. Two processes reach the first use of a C++
#                 kernel at once on an empty cache (two DDP ranks): one compiles, both run. Then
#                 the README snippets (emd on the C++ CPU kernel; BertEMDLoss on two tiny BERTs),
#                 `bert-emd info`, and a CLI user error (one line, exit 2).
#   venv "sdist": torch + bert-emd from the sdist, no extras. The kernels load from the cache the
#                 first venv filled (same torch, same sources); a command that needs the hf extra
#                 says so in one line.
# Every step is timed; the figures go to $OUT_CSV when set.
#
# Usage: scripts/check_user_install.sh [TORCH_SPEC]     (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${1:-torch==2.13.0}
WORK=$(mktemp -d /tmp/bert-emd-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export BERT_EMD_CACHE=$WORK/cache HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset BERT_EMD_NO_AOT BERT_EMD_JIT
row() { echo "install-check: $1: $2 s"; [ -n "${OUT_CSV:-}" ] && echo "$1,$2" >> "$OUT_CSV"; return 0; }
now() { date +%s.%N; }
since() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

echo "== build the sdist and the wheel (isolated build environments, as pip does)"
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install --quiet build
t=$(now)
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
row build-sdist-and-wheel "$(since "$t")"
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
echo "built: $(basename "$SDIST") $(basename "$WHEEL")"
case "$(basename "$WHEEL")" in *-py3-none-any.whl) ;; *) echo "expected a pure-Python wheel"; exit 1;; esac
"$PYTHON" - "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.startswith("bert_emd/_csrc/core/") for n in names), "wheel lacks the C++ sources"
assert not any(n.endswith(".so") for n in names), "a pure wheel must not carry a library built for some torch"
assert any("/csrc/ops.cpp" in n for n in tarfile.open(sys.argv[2]).getnames()), "sdist lacks csrc/"
EOF

fresh_venv() {  # $1 name: a venv holding only the user's torch
    "$PYTHON" -m venv "$WORK/$1"
    "$WORK/$1/bin/pip" install --quiet "$TORCH_SPEC"
    "$WORK/$1/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null > "$WORK/$1.torch"
}

assert_same_torch() {  # $1 name: plain pip kept the user's torch
    local before after
    before=$(cat "$WORK/$1.torch")
    after=$("$WORK/$1/bin/python" -c "import torch; print(torch.__version__)")
    [ "$before" = "$after" ] || { echo "pip replaced torch $before by $after"; exit 1; }
    if grep -E "Downloading torch-|Collecting torch[^a-z]" "$WORK/$1.pip.log"; then
        echo "pip fetched another torch"; exit 1
    fi
}

snippets() {  # $1 venv, then snippet names: run the README's python blocks of those names
    local venv=$1; shift
    for name in "$@"; do
        "$PYTHON" scripts/readme_snippet.py "$name" > "$WORK/snippet_$name.py"
        echo "-- README snippet: $name"
        (cd "$WORK" && "$WORK/$venv/bin/python" "snippet_$name.py")
    done
}

one_line_error() {  # $1 pattern, $2 venv, then the bert-emd arguments: one stderr line matching, exit 2
    local pattern=$1 venv=$2 code; shift 2
    set +e
    (cd "$WORK" && "$WORK/$venv/bin/bert-emd" "$@" > /dev/null 2> "$WORK/err.txt")
    code=$?
    set -e
    cat "$WORK/err.txt"
    [ "$code" = "2" ] && [ "$(wc -l < "$WORK/err.txt")" = "1" ] && grep -q "$pattern" "$WORK/err.txt" \
        || { echo "expected one stderr line matching $pattern and exit 2, got exit $code"; exit 1; }
}

echo "== wheel: plain pip into a venv holding $TORCH_SPEC"
fresh_venv wheel
t=$(now)
"$WORK/wheel/bin/pip" install "$WHEEL[hf]" > "$WORK/wheel.pip.log" 2>&1 || { tail -30 "$WORK/wheel.pip.log"; exit 1; }
row pip-install-wheel-hf "$(since "$t")"
assert_same_torch wheel
t=$(now)
"$WORK/wheel/bin/python" -X importtime -c "import bert_emd" 2> "$WORK/importtime.txt"
row import-bert_emd-process "$(since "$t")"
echo "-- two processes reach the first use at once (empty cache)"
FIRST_USE='import torch, bert_emd; r = bert_emd.emd(torch.rand(3, 4, 12), backend="cpu"); print("first use ok", float(r.cost.sum()) >= 0)'
t=$(now)
(cd "$WORK" && "$WORK/wheel/bin/python" -c "$FIRST_USE" > "$WORK/rank0.log" 2>&1) & p0=$!
(cd "$WORK" && "$WORK/wheel/bin/python" -c "$FIRST_USE" > "$WORK/rank1.log" 2>&1) & p1=$!
wait $p0 || { cat "$WORK/rank0.log"; exit 1; }
wait $p1 || { cat "$WORK/rank1.log"; exit 1; }
row first-use-compile "$(since "$t")"
cat "$WORK/rank0.log" "$WORK/rank1.log"
n=$(cat "$WORK/rank0.log" "$WORK/rank1.log" | grep -c "^bert-emd: compiling the" || true)
[ "$n" = "1" ] || { echo "expected exactly one compile, saw $n"; exit 1; }
grep -q "waiting for another process" "$WORK/rank0.log" "$WORK/rank1.log" || { echo "the second process did not wait"; exit 1; }
t=$(now)
(cd "$WORK" && "$WORK/wheel/bin/python" -c "$FIRST_USE")
row cached-load-and-solve-process "$(since "$t")"
snippets wheel emd loss
(cd "$WORK" && "$WORK/wheel/bin/bert-emd" info) | tee "$WORK/info.txt"
grep -q "compiled on first use" "$WORK/info.txt"
echo "-- a CLI user error is one line with exit status 2"
one_line_error "^bert-emd distill: error: .*no-such-model" wheel distill --teacher "$WORK/no-such-model" \
    --student-layers 2 --student-hidden 32 --student-heads 2 --student-ffn 64 --train-file "$WORK/none.csv" \
    --output-dir "$WORK/out"

echo "== sdist: plain pip into a venv holding $TORCH_SPEC, no extras"
fresh_venv sdist
t=$(now)
"$WORK/sdist/bin/pip" install "$SDIST" > "$WORK/sdist.pip.log" 2>&1 || { tail -30 "$WORK/sdist.pip.log"; exit 1; }
row pip-install-sdist "$(since "$t")"
assert_same_torch sdist
snippets sdist emd
one_line_error 'pip install "bert-emd\[hf\]"' sdist demo --quick
echo "== user install check passed"
