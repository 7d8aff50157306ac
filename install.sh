#!/usr/bin/env bash
# Installs metakernels and what it needs on a fresh machine (CPU build of PyTorch).
#   torch is pinned: an unpinned `torch` pulls a multi-GB CUDA build.
#   --no-build-isolation: the C++ extension is compiled against the torch installed here;
#   an isolated build environment would fetch another torch to build against.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet setuptools wheel pybind11 ninja
"$PY" -m pip install --quiet --no-build-isolation -e ".[test,triton,bench]"
"$PY" -c "import metakernels.backend as b; print('metakernels installed; C++ extension:', 'built' if b.cpu_available() else 'not built (' + str(b._load_cpu_extension()) + ')')"
