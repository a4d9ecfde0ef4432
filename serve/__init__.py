"""Ray Serve shell of DiMoE-VL (DESIGN.md §6): deployments, gRPC stubs and the serve config.
The logic lives in `dimoe.serving`."""
