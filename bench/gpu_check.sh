#!/usr/bin/env bash
# One command for a GPU machine (bench/gpu_check.py says what it checks):
#
#   pip install -r requirements.txt     # once; nothing is installed at run time
#   bash bench/gpu_check.sh             # estimated 3-5 minutes on one H200, at most 8
#   bash bench/gpu_check.sh --quick --output /tmp/gpu_check.json
#
# Writes outputs/gpu_check.json (--output) and the runs' logs beside it; exit 0 when every check
# passed, 1 when one failed, 2 without a CUDA GPU. PYTHON: the interpreter [the repo's
# .venv/bin/python if present, else python3]. Works from any directory.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$REPO/bench/gpu_check.py" "$@"
