#!/usr/bin/env bash
# Regenerates the Python code for protos/ (committed, so installs need no protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    protos/loraserve/v1/serving.proto protos/loraserve/v1/internal.proto
rm -f protos/loraserve/v1/internal_pb2_grpc.py  # internal.proto has no services
