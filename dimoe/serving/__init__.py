"""Serving DiMoE-VL (docs/design.md §6): everything behind the Ray Serve shell in `serve/`.

- `schemas`, `jobs`, `responses`: the OpenAI-compatible and native HTTP API — request validation,
  translation into decode jobs, response bodies and server-sent events;
- `decoder`: the decoder's work without Ray (check, batch by settings, stream);
- `client`, `http`, `errors`, `metrics`: the ingress's plumbing;
- `server`: `start_server` / `start_server_background` (what `dimoe infer serve` calls);
- `load`: the load driver and `run_serve_benchmark` (what `dimoe infer benchmark --serve-url` calls).
"""
