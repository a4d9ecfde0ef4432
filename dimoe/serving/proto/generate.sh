#!/usr/bin/env sh
# Regenerate dimoe_pb2.py and dimoe_pb2_grpc.py next to this script from dimoe.proto with
# grpcio-tools (the dev extra). protoc runs from the project root with the proto given by its path
# under it, so that the stubs import each other as `dimoe.serving.proto.*`. After regenerating,
# raise the grpcio / protobuf floors in pyproject.toml to the versions the stubs check for
# (GRPC_GENERATED_VERSION in dimoe_pb2_grpc.py, ValidateProtobufRuntimeVersion in dimoe_pb2.py).
set -eu
cd "$(dirname "$0")/../../.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. dimoe/serving/proto/dimoe.proto
