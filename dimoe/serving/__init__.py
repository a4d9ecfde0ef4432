"""Serving DiMoE-VL with Ray Serve (docs/design.md §6).

- `app`: `build_app`, the application's import path (`dimoe.serving.app:build_app`), and the
  deployment plan it makes from a ServeConfig;
- `decoder_deployment`, `ingress_deployment`, `grpc_service`: the two Serve deployments and the
  gRPC methods of the ingress; `proto`: the service definition and its generated stubs;
- `schemas`, `jobs`, `responses`: the OpenAI-compatible and native HTTP API — request validation,
  translation into decode jobs, response bodies and server-sent events;
- `decoder`: the decoder's work without Ray (check, batch by settings, stream);
- `client`, `http`, `errors`, `metrics`: the ingress's plumbing;
- `server`: `start_server` / `start_server_background` (what `dimoe infer serve` calls);
- `load`: the load driver and `run_serve_benchmark` (what `dimoe infer benchmark --serve-url` calls).
"""
