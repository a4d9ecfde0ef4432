"""The serving library without a cluster: settings fitting, request translation, errors, auth,
SSE, the decoder core (grouping, refusals, failures), the load summary and the serve config."""

import asyncio
import base64
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from dimoe.config.infer import InferConfig
from dimoe.config.loader import ConfigError
from dimoe.config.serve import LimitsConfig, ServeConfig, load_serve_config
from dimoe.infer.inputs import Request
from dimoe.serving.app import deployment_plan, serve_config_from_args
from dimoe.serving.client import DecoderClient
from dimoe.serving.decoder import DecoderCore
from dimoe.serving.errors import ApiError, RequestRejected, validation_error
from dimoe.serving.http import BearerAuth, create_api, key_digest
from dimoe.serving.jobs import (
    Completion,
    DecodeJob,
    DecodeOutcome,
    StreamEvent,
    chat_jobs,
    fit_settings,
    generate_job,
)
from dimoe.serving.load import Sample, measure, summarize
from dimoe.serving.responses import chat_chunk, chat_chunks, stream_sse
from dimoe.serving.schemas import ChatCompletionRequest, GenerateRequest
from dimoe.serving.server import GRPC_SERVICER
from tests.serve.support import data_url, direct, png_bytes

ROOT = Path(__file__).resolve().parents[2]
LIMITS = LimitsConfig(max_tokens=64, max_image_bytes=4096)


def test_fit_settings_keeps_explicit_fields_and_refuses_bad_ones():
    config = InferConfig()
    assert fit_settings(config, None, {"steps": 32}).steps == 32  # default preset (mid), explicit steps
    # An OpenAI client's max_tokens alone: the preset's schedule is fitted (InferConfig.resolve).
    fitted = fit_settings(config, "best", {"gen_length": 8})
    assert (fitted.block_length, fitted.steps) == (8, 8)
    with pytest.raises(RequestRejected) as bad:
        fit_settings(config, "fast", {"gen_length": 48, "block_length": 32})
    assert bad.value.error.status == 400 and "multiple of block_length" in bad.value.error.message
    with pytest.raises(RequestRejected) as unknown:
        fit_settings(config, "turbo", {})
    assert unknown.value.error.code == "unknown_preset" and unknown.value.error.param == "preset"


def chat(**fields):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_chat_job_carries_the_image_bytes_and_the_overrides():
    image = png_bytes()
    parts = [
        {"type": "text", "text": "Colour?"},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]
    body = chat(messages=[{"role": "user", "content": parts}], max_tokens=16, preset="fast", steps=4)
    (job,) = chat_jobs(body, LIMITS, "req-1")
    assert job.request.image == image and job.preset == "fast"
    assert job.overrides == {"gen_length": 16, "steps": 4}
    assert "base64" not in json.dumps(job.request.messages)  # the data URL is not shipped twice


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://example.com/cat.png", "remote_image_url"),
        ("/etc/passwd", "invalid_image_url"),
        ("data:image/png;base64,@@@", "bad_image_ref"),
        (data_url(b"not an image"), "bad_image"),
        (data_url(png_bytes(size=200, colour=(1, 2, 3)) + b"\0" * 5000), "image_too_large"),
    ],
)
def test_chat_job_refuses_unusable_images(url, code):
    body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    with pytest.raises(RequestRejected) as refused:
        chat_jobs(body, LIMITS, "r")
    assert refused.value.error.code == code and refused.value.error.status == 400


def test_chat_job_limits():
    two = [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}] * 2
    with pytest.raises(RequestRejected, match="at most one image"):
        chat_jobs(chat(messages=[{"role": "user", "content": two}]), LIMITS, "r")
    with pytest.raises(RequestRejected, match="limit of 64"):
        chat_jobs(chat(max_tokens=65), LIMITS, "r")
    with pytest.raises(RequestRejected, match="one of max_tokens"):
        chat_jobs(chat(max_tokens=8, max_completion_tokens=8), LIMITS, "r")


def test_generate_job_accepts_raw_base64_or_bytes():
    image = png_bytes()
    body = GenerateRequest(prompt="hi", image=base64.b64encode(image).decode(), gen_length=16)
    assert generate_job(body, LIMITS, "g").request.image == image
    assert generate_job(GenerateRequest(prompt="hi"), LIMITS, "g", image=image).request.image == image
    assert generate_job(GenerateRequest(prompt="hi", id="mine"), LIMITS, "g").request.id == "mine"


def test_validation_errors_name_the_field():
    with pytest.raises(Exception) as exc:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [], "tempreature": 1})
    error = validation_error(exc.value.errors())
    assert error.status == 400 and "messages" in error.message and "1 more problem" in error.message
    unknown = validation_error(
        RequestValidationError([{"type": "extra_forbidden", "loc": ("body", "foo"), "msg": ""}]).errors()
    )
    assert (unknown.code, unknown.param, unknown.message) == ("unknown_field", "foo", "unknown field `foo`")


def test_api_error_shapes_and_pickles():
    error = ApiError(503, "busy", code="overloaded")
    assert error.body() == {
        "error": {"message": "busy", "type": "server_error", "param": None, "code": "overloaded"}
    }
    assert error.headers() == {"Retry-After": "1"} and error.kind == "overloaded"
    assert ApiError(401, "no").headers() == {"WWW-Authenticate": "Bearer"}
    assert ApiError(418, "teapot").type == "invalid_request_error" and ApiError(502, "x").kind == "internal"
    copy = pickle.loads(pickle.dumps(RequestRejected(error)))
    assert copy.error == error and str(copy) == "busy"


def test_bearer_auth():
    BearerAuth(None).check(None)  # disabled: anything goes
    auth = BearerAuth(key_digest("s3cret"))
    auth.check("Bearer s3cret")
    auth.check("bearer  s3cret ")
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer wrong"):
        with pytest.raises(RequestRejected) as refused:
            auth.check(header)
        assert refused.value.error.status == 401


def completion(**fields):
    values = {
        "id": "c1",
        "text": "hello world",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "nfe": 4,
        "latency_s": 0.1,
        "nfe_x_active_params_b": 0.004,
        "strategy": "threshold",
    }
    return Completion(**{**values, **fields})


async def collect_sse(events, include_usage=True):
    async def source():
        for event in events:
            yield event

    opening = chat_chunk("c1", "m", 0, {"role": "assistant", "content": ""})
    return [line async for line in stream_sse(source(), chat_chunks("c1", "m", 0), include_usage, opening)]


def test_chat_sse_sends_role_blocks_finish_usage_and_done():
    events = [StreamEvent(0, "hello"), StreamEvent(1, " world", completion())]
    lines = asyncio.run(collect_sse(events))
    assert lines[-1] == "data: [DONE]\n\n" and all(line.endswith("\n\n") for line in lines)
    payloads = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["delta"].get("content") for p in payloads[1:3]] == ["hello", " world"]
    assert payloads[3]["choices"][0]["finish_reason"] == "stop" and payloads[3]["dimoe"]["nfe"] == 4
    assert payloads[4]["choices"] == [] and payloads[4]["usage"]["total_tokens"] == 7


def test_chat_sse_reports_a_failure_as_an_error_event():
    lines = asyncio.run(collect_sse([StreamEvent(error=ApiError(500, "boom"))], include_usage=False))
    assert (
        json.loads(lines[1][len("data: ") :])["error"]["message"] == "boom"
        and lines[-1] == "data: [DONE]\n\n"
    )


@pytest.fixture(scope="module")
def core(engine):
    return DecoderCore(engine)


def test_decoder_core_groups_a_batch_by_settings(core, engine):
    jobs = [
        DecodeJob(Request("a", prompt="What is 3 plus 4?"), "fast", {"gen_length": 16}),
        DecodeJob(Request("b", prompt="Where is the circle?"), "fast", {"gen_length": 32}),
        DecodeJob(Request("c", prompt="What is 5 plus 5?"), "fast", {"gen_length": 16}),
    ]
    outcomes = core.run([core.prepare(job) for job in jobs])
    assert [o.completion.id for o in outcomes] == ["a", "b", "c"]
    assert outcomes[0].completion.text == direct(engine, jobs[0].request).output
    assert outcomes[2].completion.text == direct(engine, jobs[2].request).output
    longer = engine.generate([jobs[1].request], preset="fast", gen_length=32)[0]
    assert outcomes[1].completion.text == longer.output
    assert outcomes[1].completion.nfe_x_active_params_b == pytest.approx(longer.nfe * core.active_params_b)


def test_decoder_core_refuses_a_bad_prompt_alone(core):
    with pytest.raises(RequestRejected) as refused:
        core.prepare(DecodeJob(Request("x", prompt="red " * 1000), "fast", {"gen_length": 16}))
    assert refused.value.error.code == "invalid_prompt" and "context" in refused.value.error.message


def test_decoder_core_failure_fails_its_group_only(core, monkeypatch):
    generate = core.engine.generate

    def flaky(requests, **settings):
        if settings["gen_length"] == 32:
            raise RuntimeError("device lost")
        return generate(requests, **settings)

    monkeypatch.setattr(core.engine, "generate", flaky)
    jobs = [
        DecodeJob(Request("a", prompt="hi"), "fast", {"gen_length": 32}),
        DecodeJob(Request("b", prompt="hi"), "fast", {"gen_length": 16}),
    ]
    failed, fine = core.run([core.prepare(job) for job in jobs])
    assert failed.error.status == 500 and "device lost" in failed.error.message
    assert fine.error is None and fine.completion.id == "b"


def test_decoder_core_stream_deltas_add_up_to_the_answer(core, engine):
    request = Request("s", prompt="Where is the circle?")
    events = list(
        core.stream(core.prepare(DecodeJob(request, "fast", {"gen_length": 32, "block_length": 16})))
    )
    expected = engine.generate([request], preset="fast", gen_length=32, block_length=16, steps=8)[0]
    assert "".join(e.delta for e in events) == expected.output
    assert events[-1].completion.text == expected.output and all(e.completion is None for e in events[:-1])


def test_measure_keeps_concurrency_and_counts_every_request():
    in_flight, peak, seen = 0, 0, []

    async def call(index):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        seen.append(index)
        return Sample(0.01, None if index % 10 else "http_503", completion_tokens=4, nfe=2)

    report = asyncio.run(measure(call, concurrency=4, requests=50, warmup=4))
    assert peak == 4 and sorted(seen) == list(range(54))
    assert (report["requests"], report["ok"], report["errors"]) == (50, 45, 5)
    assert report["errors_by_kind"] == {"http_503": 5} and report["mean_nfe"] == 2


def test_summarize_percentiles():
    samples = [Sample(float(i), completion_tokens=1) for i in range(1, 101)]
    report = summarize(samples, wall_s=10.0, concurrency=8)
    assert report["latency_p50_s"] == pytest.approx(50.5) and report["latency_p99_s"] == pytest.approx(99.01)
    assert report["requests_per_s"] == 10.0 and report["tokens_per_s"] == 10.0


def test_serve_config_checks_batching_against_ongoing_requests():
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        load_serve_config(None, ["batching.max_batch_size=32", "decoder.max_ongoing_requests=8"])
    assert ServeConfig(batching={"max_batch_size": 8}).decoder_max_ongoing_requests == 16


def test_deployment_plan(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        deployment_plan(ServeConfig())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        deployment_plan(ServeConfig(checkpoint=str(tmp_path)))
    config = load_serve_config(
        None,
        ["decoder.autoscaling.max_replicas=3"],
        checkpoint=str(checkpoint),
        api_key="sekret-xyz",
        batching={"max_batch_size": 4},
    )
    plan = deployment_plan(config)
    assert plan.decoder_options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4,
    }
    assert plan.decoder_options["max_ongoing_requests"] == 8 and "num_replicas" not in plan.decoder_options
    assert plan.decoder_args["max_batch_size"] == 4 and Path(plan.decoder_args["checkpoint"]).is_absolute()
    assert plan.ingress_args["api_key_sha256"] == key_digest("sekret-xyz")
    assert "sekret-xyz" not in json.dumps(plan.ingress_args)


def test_serve_config_yaml_args_build_a_valid_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    serve_config = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    (application,) = serve_config["applications"]
    assert application["import_path"] == "dimoe.serving.app:build_app"
    assert serve_config["grpc_options"]["grpc_servicer_functions"] == [GRPC_SERVICER]
    config = serve_config_from_args({**application["args"], "set": ["limits.max_tokens=128"]})
    assert config.checkpoint == application["args"]["checkpoint"] and config.limits.max_tokens == 128


@pytest.fixture(scope="module")
def api_client():
    """The ingress's FastAPI app with one echo route, without Serve."""
    api = create_api()

    @api.post("/v1/echo")
    async def echo(body: GenerateRequest) -> dict:
        return {"prompt": body.prompt}

    api.state.limits = LimitsConfig(max_request_bytes=1024)
    api.state.auth = BearerAuth(key_digest("k3y"))
    api.state.metrics = RecordingMetrics()
    with TestClient(api, raise_server_exceptions=False) as client:
        yield client, api.state.metrics


class RecordingMetrics:
    def __init__(self):
        self.seen = []

    def request(self, endpoint, protocol, status):
        self.seen.append((endpoint, protocol, status))


def test_api_refuses_large_bodies_even_without_a_length(api_client):
    client, _ = api_client
    headers = {"Authorization": "Bearer k3y", "Content-Type": "application/json"}
    declared = client.post("/v1/echo", headers=headers, content=b"x" * 2000)
    chunked = client.post("/v1/echo", headers=headers, content=iter([b"x" * 600, b"x" * 600]))
    for response in (declared, chunked):
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert client.post("/v1/echo", headers=headers, json={"prompt": "hi"}).json() == {"prompt": "hi"}


def test_api_authenticates_before_reading_and_shapes_every_error(api_client):
    client, metrics = api_client
    unauthenticated = client.post("/v1/echo", content=b"{not json")
    assert unauthenticated.status_code == 401 and unauthenticated.headers["WWW-Authenticate"] == "Bearer"
    headers = {"Authorization": "Bearer k3y"}
    missing = client.get("/v1/nothing-here", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = client.get("/v1/echo", headers=headers)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert {("other", "http", 401), ("other", "http", 404), ("/v1/echo", "http", 405)} <= set(metrics.seen)
    client.post("/v1/echo", headers=headers, json={"prompt": "hi"})
    assert metrics.seen[-1] == ("/v1/echo", "http", 200)


class FakeHandle:
    """Stands in for the decoder's DeploymentHandle: `generate` answers `outcome` or raises
    `raises`; `stream` yields `events`."""

    def __init__(self, outcome=None, raises=None, events=()):
        self.outcome, self.raises, self.events = outcome, raises, list(events)
        self.generate = SimpleNamespace(remote=self._generate)
        self.stream = SimpleNamespace(remote=self._stream)
        self.info = SimpleNamespace(remote=lambda: asyncio.sleep(10))

    def options(self, **_):
        return self

    async def _generate(self, job):
        if self.raises is not None:
            raise self.raises
        return self.outcome

    async def _stream(self, job):
        if self.raises is not None:
            raise self.raises
        for event in self.events:
            yield event


def test_decoder_client_maps_back_pressure_and_refusals():
    job = DecodeJob(Request("a", prompt="hi"))
    full = DecoderClient(FakeHandle(raises=BackPressureError(10, 10)))
    for call in (full.complete(job), full.open_stream(job)):
        with pytest.raises(RequestRejected) as refused:
            asyncio.run(call)
        assert refused.value.error.status == 503 and refused.value.error.headers() == {"Retry-After": "1"}
    refusal = ApiError(400, "bad prompt", code="invalid_prompt")
    with pytest.raises(RequestRejected, match="bad prompt"):
        asyncio.run(DecoderClient(FakeHandle(DecodeOutcome(error=refusal))).complete(job))
    with pytest.raises(RequestRejected, match="bad prompt"):
        asyncio.run(DecoderClient(FakeHandle(events=[StreamEvent(error=refusal)])).open_stream(job))
    assert asyncio.run(DecoderClient(FakeHandle(DecodeOutcome(completion()))).complete(job)) == completion()
    with pytest.raises(TimeoutError):
        asyncio.run(DecoderClient(FakeHandle()).info(timeout_s=0.01))
