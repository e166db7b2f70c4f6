"""Bad input gets a 4xx with an OpenAI-style body naming the problem, and the server keeps
serving; API keys; the body-size limit; remote images only behind the flag; /health."""

from __future__ import annotations

import base64
import copy
import http.server
import io
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from factories import BLUE, make_image, png_bytes
from openai_helpers import (
    API_KEY,
    LIMITS,
    MAX_REQUEST_BYTES,
    MODEL_NAME,
    ServerThread,
    image_part,
    text_part,
    wait_until_idle,
)

from serving.engine import Engine, EngineConfig, EngineLoop, RequestOutput
from serving.openai_api import create_app, set_backend
from visualchat.images import ImageLimits
from visualchat.messages import Conversation
from visualchat.sampling import SamplingParams

GOOD = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def with_fields(**fields) -> dict:
    return {**GOOD, **fields}


def user_parts(*parts: dict) -> dict:
    return with_fields(messages=[{"role": "user", "content": list(parts)}])


def corrupt_png() -> str:
    data = png_bytes(make_image())
    return "data:image/png;base64," + base64.b64encode(data[: len(data) // 2]).decode()


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# (id, request body (dict, or raw bytes), status, param, code, words the message must contain)
BAD_REQUESTS = [
    ("malformed-json", b'{"messages": [', 400, None, None, "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, None, None, "must be a JSON object"),
    ("missing-messages", {"model": MODEL_NAME}, 400, "messages", None, "Field required"),
    ("max-tokens-string", with_fields(max_tokens="5"), 400, "max_tokens", None, "valid integer"),
    ("temperature-string", with_fields(temperature="hot"), 400, "temperature", None, "number"),
    ("stream-string", with_fields(stream="yes"), 400, "stream", None, "valid boolean"),
    ("stop-list-of-ints", with_fields(stop=[1]), 400, "stop[0]", None, "valid string"),
    (
        "content-number",
        with_fields(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        None,
        "Input should be a valid string, or a valid array",
    ),
    ("n-2", with_fields(n=2), 400, "n", None, "n must be 1"),
    ("temperature-negative", with_fields(temperature=-1), 400, "temperature", None, "[0, 100]"),
    ("top-p-zero", with_fields(top_p=0.0), 400, "top_p", None, "(0, 1]"),
    ("max-tokens-zero", with_fields(max_tokens=0), 400, "max_tokens", None, "positive"),
    ("top-k-negative", with_fields(top_k=-3), 400, "top_k", None, "non-negative"),
    ("empty-stop", with_fields(stop=[""]), 400, "stop", None, "non-empty"),
    ("empty-messages", with_fields(messages=[]), 400, "messages", None, "must not be empty"),
    (
        "tool-role",
        with_fields(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
        400,
        "messages[0]",
        None,
        "unsupported role 'tool'",
    ),
    (
        "audio-part",
        user_parts({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}),
        400,
        "messages[0].content[0]",
        None,
        "unsupported content part type 'input_audio'",
    ),
    (
        "bare-path",
        user_parts(url_part("/etc/passwd")),
        400,
        "messages[0].content[0]",
        None,
        "not a bare path",
    ),
    (
        "file-url",
        user_parts(url_part("file:///etc/hostname")),
        400,
        "messages",
        "invalid_image",
        "local image files are disabled",
    ),
    (
        "remote-url",
        user_parts(url_part("http://127.0.0.1:9/x.png")),
        400,
        "messages",
        "invalid_image",
        "remote image URLs are disabled",
    ),
    (
        "corrupt-image",
        user_parts(url_part(corrupt_png()), text_part("what?")),
        400,
        "messages",
        "invalid_image",
        "corrupt or truncated image",
    ),
    (
        "not-an-image",
        user_parts(url_part("data:image/png;base64," + base64.b64encode(b"hello").decode())),
        400,
        "messages",
        "invalid_image",
        "not an image",
    ),
    (
        "too-many-pixels",
        user_parts(image_part(make_image(BLUE, size=(100, 100)))),
        400,
        "messages",
        "invalid_image",
        f"too many pixels: 100x100 = 10000 (max {LIMITS.max_pixels}",
    ),
    (
        "image-too-many-bytes",
        user_parts(url_part("data:image/png;base64," + "A" * 50_000)),
        400,
        "messages",
        "invalid_image",
        f"image too large: 37500 bytes (max {LIMITS.max_bytes} bytes",
    ),
    (
        "too-many-images",
        user_parts(*[image_part() for _ in range(LIMITS.max_images + 1)]),
        400,
        "messages",
        "invalid_image",
        f"too many images: {LIMITS.max_images + 1} (max {LIMITS.max_images}",
    ),
    (
        "context-length",
        with_fields(messages=[{"role": "user", "content": "hello world " * 400}]),
        400,
        "messages",
        "context_length_exceeded",
        "the model's context is 512",
    ),
    (
        "unknown-model",
        with_fields(model="gpt-4o"),
        404,
        "model",
        "model_not_found",
        "'gpt-4o' does not exist",
    ),
    (
        "body-too-large",
        user_parts(text_part("x" * (MAX_REQUEST_BYTES + 1))),
        413,
        None,
        "request_too_large",
        f"larger than {MAX_REQUEST_BYTES} bytes",
    ),
]


def assert_error(response: httpx.Response, status: int, param, code, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["param"] == param
    assert error["code"] == code
    expected_type = "authentication_error" if status == 401 else "invalid_request_error"
    assert error["type"] == expected_type


def assert_serving(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(
    http, replica, body, status, param, code, words
) -> None:
    for stream in (False, True):
        if isinstance(body, bytes):
            response = http.post(
                "/v1/chat/completions",
                content=body,
                headers={"content-type": "application/json"},
            )
        else:
            response = http.post("/v1/chat/completions", json={"stream": stream, **body})
        assert_error(response, status, param, code, words)
    assert_serving(http)
    wait_until_idle(replica.engine)


def test_body_too_large_without_content_length_is_refused_while_reading(http) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_REQUEST_BYTES // 1000 + 1):
            yield b"x" * 1000
        yield b'"}]}'

    response = http.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, None, "request_too_large", "larger than")
    assert_serving(http)


def test_the_official_client_raises_the_message(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "hi"}],
            temperature=-1,
        )
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
    assert "temperature must be in [0, 100], got -1" in caught.value.message


def test_unknown_fields_are_ignored(http) -> None:
    response = http.post(
        "/v1/chat/completions",
        json=with_fields(frequency_penalty=0.5, logit_bias={}, some_future_field={"a": 1}),
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong-key"}, "incorrect API key"),
        ({"Authorization": f"Basic {API_KEY}"}, "missing API key"),
    ],
    ids=["missing", "wrong", "not-bearer"],
)
def test_api_key_is_required(server, headers, words) -> None:
    with httpx.Client(base_url=server.base_url, headers=headers) as http:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            response = http.request(method, path, json=GOOD)
            assert_error(response, 401, None, "invalid_api_key", words)
        assert http.get("/health").status_code == 200


def test_wrong_api_key_raises_authentication_error(server) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401


def test_unknown_route_is_an_openai_style_404(http) -> None:
    response = http.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_health_is_503_while_loading_then_200(replica) -> None:
    app = create_app(None, MODEL_NAME)
    with ServerThread(app) as running, httpx.Client(base_url=running.base_url) as http:
        response = http.get("/health")
        assert (response.status_code, response.json()) == (503, {"status": "loading"})
        response = http.post("/v1/chat/completions", json=GOOD)
        assert response.status_code == 503
        assert "still loading" in response.json()["error"]["message"]
        set_backend(app, replica.loop)
        response = http.get("/health")
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        assert_serving(http)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        buffer = io.BytesIO()
        make_image(BLUE).save(buffer, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(buffer.getvalue())

    def log_message(self, *args: object) -> None:
        pass


def test_remote_images_are_fetched_only_when_allowed(replica, reference) -> None:
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/blue.png"
    body = user_parts(url_part(url), text_part("what color?"))
    try:
        refusing = create_app(replica.loop, MODEL_NAME)
        allowing = create_app(
            replica.loop, MODEL_NAME, limits=ImageLimits(allow_remote=True, allow_local_files=False)
        )
        with ServerThread(refusing) as off, ServerThread(allowing) as on:
            response = httpx.post(f"{off.base_url}/v1/chat/completions", json=body)
            assert_error(
                response, 400, "messages", "invalid_image", "remote image URLs are disabled"
            )
            response = httpx.post(
                f"{on.base_url}/v1/chat/completions", json={**body, "temperature": 0}
            )
            assert response.status_code == 200, response.text
    finally:
        images.shutdown()
    inline = user_parts(image_part(make_image(BLUE)), text_part("what color?"))["messages"]
    expected = reference.generate(Conversation.from_openai(inline), SamplingParams(max_tokens=2))
    assert response.json()["choices"][0]["message"]["content"] == expected.text
    assert response.json()["usage"]["prompt_tokens"] == expected.num_prompt_tokens


def test_prompt_over_the_cache_is_a_context_length_error(tiny_model) -> None:
    """The engine refuses it on its own thread; the error still becomes a 400, not a 200."""
    model, tokenizer = tiny_model
    small = Engine(
        copy.deepcopy(model),
        tokenizer,
        EngineConfig(max_num_batched_tokens=64, num_blocks=4, block_size=8),
    )
    loop = EngineLoop(small)
    body = with_fields(messages=[{"role": "user", "content": "hello world " * 10}])
    body.pop("model")
    try:
        with ServerThread(create_app(loop, MODEL_NAME)) as running:
            for stream in (False, True):
                response = httpx.post(
                    f"{running.base_url}/v1/chat/completions", json={**body, "stream": stream}
                )
                assert_error(
                    response, 400, "messages", "context_length_exceeded", "cache 32 tokens"
                )
    finally:
        loop.shutdown()


class FailingBackend:
    """Streams one delta, then fails as an engine step would."""

    num_active = 0

    async def astream_outputs(self, conversation, params, limits=None):
        yield RequestOutput("r", "partial", [5], False, None, 3, 1)
        raise RuntimeError("engine step failed")


def test_a_failure_mid_stream_is_reported_in_band() -> None:
    app = create_app(FailingBackend(), MODEL_NAME)
    with ServerThread(app) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        received = []
        with pytest.raises(openai.APIError, match="internal error: RuntimeError: engine step"):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        assert received == ["", "partial"]
        response = httpx.post(
            f"{running.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
