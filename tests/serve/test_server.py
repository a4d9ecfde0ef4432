"""The Serve application end to end on a real local cluster: OpenAI client (text, image, stream),
malformed input, auth, gRPC, and batching of concurrent callers."""

import asyncio
import base64

import grpc
import httpx
import openai
import pytest
from ray import serve

from dimoe.infer.inputs import Request
from dimoe.serving.load import run_serve_benchmark
from dimoe.serving.proto import dimoe_pb2 as pb2
from dimoe.serving.proto import dimoe_pb2_grpc as pb2_grpc
from tests.serve.support import API_KEY, LIMITS, MODEL, data_url, direct, png_bytes

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAST16 = {"max_tokens": 16, "preset": "fast"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=120) as session:
        yield session


def chat_body(content, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **FAST16, **extra}


def test_openai_client_text_completion(client, engine):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 3 plus 4?"}],
        max_tokens=16,
        extra_body={"preset": "fast"},
    )
    expected = direct(engine, Request("x", prompt="What is 3 plus 4?"))
    assert response.object == "chat.completion" and response.model == MODEL and response.id
    assert response.choices[0].message.content == expected.output
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(expected.output_ids)
    stats = response.model_extra["dimoe"]
    assert stats["nfe"] == expected.nfe and stats["latency_s"] > 0 and stats["nfe_x_active_params_b"] > 0


def test_openai_client_image_completion(client, engine):
    image = png_bytes()
    content = [
        {"type": "text", "text": "What colour is the square?"},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=16,
        extra_body={"preset": "fast"},
    )
    expected = direct(engine, Request("x", messages=[{"role": "user", "content": content}]))
    assert response.choices[0].message.content == expected.output
    assert response.usage.prompt_tokens == len(expected.prompt_ids)  # the image tokens are in the prompt
    assert response.usage.prompt_tokens > engine.model.config.num_image_tokens


def test_openai_client_streams_blocks(client, engine):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Where is the circle?"}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"preset": "fast", "block_length": 16},  # two blocks → at least two content chunks
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected = engine.generate(
        [Request("x", prompt="Where is the circle?")], preset="fast", gen_length=32, block_length=16, steps=8
    )[0]
    assert text == expected.output and finish == ["stop" if len(expected.output_ids) < 32 else "length"]
    assert chunks[-1].usage.completion_tokens == len(expected.output_ids)


def test_cache_field_decodes_as_the_engine_with_that_cache(client, server, engine):
    """`cache` (an extension field, like `preset`) reaches the engine over REST and gRPC; the
    block cache is approximate, so the reference is the engine run with the same setting."""
    prompt = "What is 2 plus 5?"
    expected = direct(engine, Request("x", prompt=prompt), cache="block")
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16,
        extra_body={"preset": "fast", "cache": "block"},
    )  # fmt: skip
    assert response.choices[0].message.content == expected.output
    assert response.model_extra["dimoe"]["nfe"] == expected.nfe
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = pb2.GenerateRequest(prompt=prompt, preset="fast", gen_length=16, cache="block")
        metadata = [("authorization", f"Bearer {API_KEY}")]
        reply = pb2_grpc.DiMoEStub(channel).Generate(request, metadata=metadata)
    assert reply.text == expected.output
    with pytest.raises(openai.BadRequestError, match="cache"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], extra_body={"cache": "dual"}
        )


def test_raw_sse_ends_with_done(http):
    with http.stream(
        "POST", "/v1/chat/completions", headers=AUTH, json=chat_body("Hi", stream=True)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


BAD_INPUTS = {
    "malformed JSON": ("/v1/chat/completions", {"content": b'{"model": "x", '}, 400, "invalid_json"),
    "body not an object": ("/v1/chat/completions", {"json": [1, 2]}, 400, "invalid_body"),
    "unknown field": ("/v1/chat/completions", {"json": chat_body("hi", temprature=1)}, 400, "unknown_field"),
    "no messages": ("/v1/chat/completions", {"json": {"model": MODEL}}, 400, "missing_field"),
    "bad role": (
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}},
        400,
        "invalid_value",
    ),
    "too many tokens": (
        "/v1/chat/completions",
        {"json": chat_body("hi", max_tokens=10_000)},
        400,
        "max_tokens_exceeded",
    ),
    "prompt over the context": (
        "/v1/chat/completions",
        {"json": chat_body("red green blue yellow " * 300)},
        400,
        "invalid_prompt",
    ),
    "unknown model": (
        "/v1/chat/completions",
        {"json": {**chat_body("hi"), "model": "gpt-4"}},
        404,
        "model_not_found",
    ),
    "unknown preset": (
        "/v1/chat/completions",
        {"json": chat_body("hi", preset="turbo")},
        400,
        "unknown_preset",
    ),
    "bad strategy": (
        "/v1/chat/completions",
        {"json": chat_body("hi", strategy="beam")},
        400,
        "invalid_decode_settings",
    ),
    "remote image URL": (
        "/v1/chat/completions",
        {"json": chat_body([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])},
        400,
        "remote_image_url",
    ),
    "bad base64": ("/v1/generate", {"json": {"prompt": "hi", "image": "not base64!!"}}, 400, "bad_image_ref"),
    "non-image bytes": (
        "/v1/generate",
        {"json": {"prompt": "hi", "image": base64.b64encode(b"hello, not an image").decode()}},
        400,
        "bad_image",
    ),
    "image over the size limit": (
        "/v1/generate",
        {
            "json": {
                "prompt": "hi",
                "image": base64.b64encode(b"\0" * (LIMITS["max_image_bytes"] + 1)).decode(),
            }
        },
        400,
        "image_too_large",
    ),
    "body over the size limit": (
        "/v1/generate",
        {"content": b"x" * (LIMITS["max_request_bytes"] + 1)},
        413,
        "request_too_large",
    ),
    "empty prompt": ("/v1/generate", {"json": {"prompt": ""}}, 400, "invalid_value"),
    "seed out of range": ("/v1/generate", {"json": {"prompt": "hi", "seed": 2**70}}, 400, "invalid_value"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_malformed_input_gets_a_4xx_error_object(http, case):
    path, payload, status, code = BAD_INPUTS[case]
    headers = {**AUTH, "Content-Type": "application/json"}
    response = http.post(path, headers=headers, **payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code


def test_chunked_body_over_the_size_limit_is_refused(http):
    half = b"x" * (LIMITS["max_request_bytes"] // 2 + 1)
    response = http.post("/v1/generate", headers=AUTH, content=iter([half, half]))  # no Content-Length
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_server_stays_healthy_after_bad_input(http, engine):
    http.post("/v1/chat/completions", headers=AUTH, content=b"\xff\xfe garbage")
    assert http.get("/healthz").json()["status"] == "ok"
    response = http.post(
        "/v1/generate", headers=AUTH, json={"prompt": "What is 3 plus 4?", "gen_length": 16, "preset": "fast"}
    )
    assert response.status_code == 200
    assert response.json()["text"] == direct(engine, Request("x", prompt="What is 3 plus 4?")).output


def test_auth_required_except_health(http, server):
    body = chat_body("hi")
    assert http.post("/v1/chat/completions", json=body).status_code == 401
    wrong = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "invalid_request_error"
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/v1/models").status_code == 401
    assert http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    assert http.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
    assert http.get("/healthz").status_code == 200


def test_grpc_generate_and_stream(server, engine):
    metadata = [("authorization", f"Bearer {API_KEY}")]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb2_grpc.DiMoEStub(channel)
        assert stub.Health(pb2.HealthRequest()).ok
        request = pb2.GenerateRequest(prompt="What is 1 plus 1?", preset="fast", gen_length=16)
        reply = stub.Generate(request, metadata=metadata)
        expected = direct(engine, Request("x", prompt="What is 1 plus 1?"))
        assert reply.text == expected.output and reply.nfe == expected.nfe
        assert reply.completion_tokens == len(expected.output_ids)

        chunks = list(stub.GenerateStream(request, metadata=metadata))
        assert "".join(c.delta for c in chunks) == expected.output
        assert chunks[-1].done and chunks[-1].result.text == expected.output

        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        too_long = pb2.GenerateRequest(prompt="hi", gen_length=10_000)
        with pytest.raises(grpc.RpcError) as invalid:
            list(stub.GenerateStream(too_long, metadata=metadata))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "10000" in invalid.value.details()


def test_concurrent_requests_are_batched_and_answered_each(server, engine):
    prompts = [f"What is {i} plus {i % 7}?" for i in range(8)]
    decoder = serve.get_deployment_handle("Decoder", app_name=server.config.app_name)
    before = decoder.stats.remote().result()

    async def ask_all():
        async with httpx.AsyncClient(base_url=server.http_url, headers=AUTH, timeout=120) as session:
            replies = await asyncio.gather(
                *(session.post("/v1/chat/completions", json=chat_body(p)) for p in prompts)
            )
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    answers = asyncio.run(ask_all())
    after = decoder.stats.remote().result()
    assert answers == [direct(engine, Request("x", prompt=p)).output for p in prompts]
    assert len(set(answers)) > 1  # the prompts' answers differ, so a mix-up would show
    assert after["requests"] - before["requests"] == len(prompts)
    new_sizes = {
        size: after["batch_sizes"].get(size, 0) - before["batch_sizes"].get(size, 0)
        for size in after["batch_sizes"]
    }
    assert max(size for size, count in new_sizes.items() if count > 0) > 1
    assert after["batches"] - before["batches"] < len(prompts)


def test_benchmark_reports_http_from_an_actor_and_grpc_in_process(server):
    # No model given: the driver asks the server for it (this server's is not the default name).
    http_report = run_serve_benchmark(server.http_url, [1, 4], requests=8, api_key=API_KEY, warmup=0)
    grpc_report = run_serve_benchmark(
        f"grpc://{server.grpc_target}", 2, requests=4, api_key=API_KEY, warmup=0, use_ray=False
    )
    for level in [*http_report["levels"], *grpc_report["levels"]]:
        assert level["errors"] == 0 and level["ok"] == level["requests"]
        assert (
            level["requests_per_s"] > 0 and level["mean_nfe"] > 0 and level["mean_nfe_x_active_params_b"] > 0
        )
        assert level["latency_p50_s"] <= level["latency_p95_s"] <= level["latency_p99_s"]
    assert [level["concurrency"] for level in http_report["levels"]] == [1, 4]
    assert grpc_report["protocol"] == "grpc" and grpc_report["levels"][0]["requests"] == 4


STORY = "Tell me a story about a red square."


def test_openai_client_n_choices_sample_with_seed_plus_index(client, engine):
    """n choices decode in one batch; choice i samples with seed + i, so the same seed gives the
    same texts, each what the engine gives that request alone with that seed."""
    ask = {"model": MODEL, "messages": [{"role": "user", "content": STORY}], "max_tokens": 16,
           "temperature": 1.0, "seed": 7, "extra_body": {"preset": "fast"}}  # fmt: skip
    first = client.chat.completions.create(n=3, **ask)
    again = client.chat.completions.create(n=3, **ask)
    texts = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert texts == [choice.message.content for choice in again.choices]
    expected = [
        direct(engine, Request("x", prompt=STORY, seed=7 + i), temperature=1.0).output for i in range(3)
    ]
    assert texts == expected and len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(
        len(direct(engine, Request("x", prompt=STORY, seed=7 + i), temperature=1.0).output_ids)
        for i in range(3)
    )


def test_openai_client_stop_cuts_before_the_stop_string(client, engine):
    greedy = direct(engine, Request("x", prompt=STORY)).output
    assert len(greedy) >= 6, f"the fixture model's answer is too short to cut: {greedy!r}"
    stop = greedy[3:6]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": STORY}], max_tokens=16, stop=[stop, "never there"],
        extra_body={"preset": "fast"},
    )  # fmt: skip
    assert reply.choices[0].message.content == greedy[: greedy.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_openai_client_logprobs_are_the_reveal_probabilities(client, engine):
    messages = [{"role": "user", "content": STORY}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        logprobs=True,
        top_logprobs=3,
        extra_body={"preset": "fast"},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # Greedy decoding reveals the most likely token: its logprob is the step's top one.
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.token == token.top_logprobs[0].token


def test_openai_client_text_completions_continue_the_prompt_as_written(client, engine):
    prompts = ["Once upon a time", "The answer is"]
    reply = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=16, n=2, extra_body={"preset": "fast"}
    )
    assert reply.object == "text_completion" and len(reply.choices) == 4
    for index, choice in enumerate(reply.choices):
        expected = direct(
            engine, Request("x", prompt=prompts[index // 2], chat_template=False, seed=index % 2)
        )
        assert choice.index == index and choice.text == expected.output


def test_unsupported_fields_are_named_and_no_effect_fields_accepted(http):
    refusals = {
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "logit_bias": {"5": 1.0},
        "presence_penalty": 0.5,
        "response_format": {"type": "json_object"},
    }
    for field, value in refusals.items():
        refused = http.post("/v1/chat/completions", json=chat_body("hi", **{field: value}), headers=AUTH)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    fine = chat_body("hi", user="u1", metadata={"k": "v"}, frequency_penalty=0, store=False,
                     response_format={"type": "text"}, stream_options=None)  # fmt: skip
    assert http.post("/v1/chat/completions", json=fine, headers=AUTH).status_code == 200
    echo = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "echo": True}, headers=AUTH)
    assert echo.status_code == 400 and echo.json()["error"]["param"] == "echo"
