#!/usr/bin/env bash
# Create benchmarks/.fusionbench-venv with CPU torch, FusionBench and mergekit, isolated from the project's
# environment (FusionBench pulls in torch, transformers and lightning).
#
# Usage: bash benchmarks/fusionbench/setup.sh   (from anywhere; idempotent)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../.fusionbench-venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import fusion_bench, mergekit, torch" 2>/dev/null; then
    echo "FusionBench environment ready: $venv"
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# CPU torch first (a +cpu wheel), so FusionBench does not pull a CUDA build. Do not add PyPI
# torchvision next to it: that fails at import.
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet "fusion-bench==0.2.33" numpy
# mergekit adds only immutables and sentencepiece to FusionBench's dependencies.
"$venv/bin/python" -m pip install --quiet "mergekit==0.1.5"
"$venv/bin/python" -c "import fusion_bench, torch; print('fusion_bench', fusion_bench.__file__, 'torch', torch.__version__)"
