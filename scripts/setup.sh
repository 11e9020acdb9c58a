#!/usr/bin/env bash
# Creates .venv with everything loraserve and its tests need. Idempotent.
# torch is pinned first: on a machine whose pip offers a local CPU build this is quick;
# from PyPI on Linux it is the CUDA build, so GPU users get CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.lock
python -m pip install -q --no-deps -e .
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__)"
