#!/usr/bin/env sh
# Regenerate serve/proto/dimoe_pb2.py and dimoe_pb2_grpc.py from dimoe.proto with grpcio-tools.
# Run from anywhere; the stubs import each other as `serve.proto.*`, so protoc runs from the
# project root with the proto given by its path under it.
set -eu
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. serve/proto/dimoe.proto
