#!/usr/bin/env bash
# Set up llm-repro on a fresh machine: the embedded corpus's Python docs (where apt exists),
# PyTorch (kept if already installed; otherwise the pinned release), then the project and its
# test dependencies in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
  echo "setup: installing Debian's python3.11-doc (the corpus's English prose)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3.11-doc >/dev/null \
    || echo "setup: python3.11-doc unavailable; the default corpus will be the standard library alone"
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch"
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
echo "setup: installing llm-repro and its dependencies"
"$PYTHON" -m pip install -q -e ".[test]"
"$PYTHON" -c "import torch, lightning; print(f'setup: ready (torch {torch.__version__}, lightning {lightning.__version__})')"
