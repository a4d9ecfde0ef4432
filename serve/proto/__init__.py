"""gRPC definition of the DiMoE-VL service and its generated stubs (serve/proto/generate.sh)."""
