"""Ray Serve shell of DiMoE-VL (docs/design.md §6): deployments, gRPC stubs and the serve config.
The logic lives in `dimoe.serving`."""
