"""Bad requests get OpenAI error objects with the right status; auth; adapter path fences; 429; crashes.

Raw HTTP (httpx) so the status, headers and error fields are checked exactly
as a client sees them.
"""
import json
import os
import shutil
import threading

import httpx
import openai
import pytest

from coserve.api.app import create_app
from coserve.api.settings import API_KEY_ENV, ServerSettings
from tests.api.conftest import MODEL_ID, LiveServer
from tests.helpers import make_peft_adapter_dir


def post(server, path, body=None, *, content=None, headers=None):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=120)


def assert_error(response, status, *, type_=None, param="unset", code="unset"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if type_ is not None:
        assert error["type"] == type_
    if param != "unset":
        assert error["param"] == param, error
    if code != "unset":
        assert error["code"] == code, error
    return error


# ---- validation ------------------------------------------------------------------------------------


def test_malformed_json(server):
    response = post(server, "/v1/completions", content=b'{"model": "tiny-llama", "prompt": ',
                    headers={"content-type": "application/json"})
    error = assert_error(response, 400, type_="invalid_request_error", code="invalid_json")
    assert "malformed JSON" in error["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]},
     "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "logprobs": 1},
     "logprobs"),
])
def test_wrong_types_name_the_field(server, path, body, param):
    assert_error(post(server, path, body), 400, type_="invalid_request_error", param=param)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x", "stream": True}),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
])
def test_unknown_model_is_404(server, path, body):
    assert_error(post(server, path, body), 404, type_="not_found_error", param="model", code="model_not_found")


def test_unknown_model_card_and_route(server):
    assert_error(httpx.get(server.url + "/v1/models/nope"), 404, code="model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404, type_="not_found_error")


def test_prompt_longer_than_the_model(server, backend):
    too_long = [5] * backend.max_model_len
    assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": too_long}), 400,
                 param="prompt", code="context_length_exceeded")
    words = " ".join(["hello"] * backend.max_model_len)
    assert_error(post(server, "/v1/chat/completions",
                      {"model": MODEL_ID, "messages": [{"role": "user", "content": words}]}), 400,
                 param="messages", code="context_length_exceeded")


@pytest.mark.parametrize("max_tokens", [0, -3, 10 ** 6])
def test_max_tokens_out_of_range(server, max_tokens):
    assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": max_tokens}),
                 400, type_="invalid_request_error", param="max_tokens")


@pytest.mark.parametrize("extra, param", [({"echo": True}, "echo"), ({"presence_penalty": 0.5}, "presence_penalty"),
                                          ({"stream_options": {"include_usage": True}}, "stream_options")])
def test_unsupported_options_are_refused(server, extra, param):
    assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", **extra}), 400, param=param)


def test_oversized_bodies_are_413(make_server):
    server = make_server(max_request_bytes=1000)
    big = {"model": MODEL_ID, "prompt": "x" * 2000}
    assert_error(post(server, "/v1/completions", big), 413, code="request_too_large")

    def chunks():   # no Content-Length: the limit applies while the body streams in
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    response = httpx.post(server.url + "/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    assert_error(response, 413)
    assert post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_token_ids_out_of_vocab(server):
    assert_error(post(server, "/v1/completions", {"model": MODEL_ID, "prompt": [10 ** 7]}), 400, param="prompt")


def test_openai_client_sees_typed_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=10 ** 6)


# ---- a backend that fails: 500, and the server keeps serving --------------------------------------


class BrokenBackend:
    """Delegates to the real backend, but generation raises."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def generate(self, *args, **kwargs):
        raise RuntimeError("boom in the engine")

    def generate_stream(self, *args, **kwargs):
        yield from ()
        raise RuntimeError("boom in the stream")


def test_backend_errors_are_500_and_the_server_survives(backend, tmp_path):
    server = LiveServer(create_app(BrokenBackend(backend), ServerSettings(model_id=MODEL_ID, data_dir=tmp_path)))
    try:
        body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
        for _ in range(2):
            error = assert_error(post(server, "/v1/completions", body), 500, type_="server_error")
            assert "boom in the engine" in error["message"]
        error = assert_error(post(server, "/v1/completions", {**body, "stream": True}), 500, type_="server_error")
        assert "boom in the stream" in error["message"]
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 200
        assert server.state.extras["gate"].num_in_flight == 0
    finally:
        server.stop()


# ---- auth --------------------------------------------------------------------------------------------


def test_api_key_guards_v1_routes_only(make_server):
    server = make_server(api_key="sekret")
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401, type_="authentication_error",
                     code="invalid_api_key")
        assert_error(post(server, "/v1/completions", body, headers=headers), 401)
        assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "b"}, headers=headers),
                     401)
    good = {"Authorization": "Bearer sekret"}
    assert httpx.get(server.url + "/v1/models", headers=good).status_code == 200
    assert post(server, "/v1/completions", body, headers=good).status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200    # open, as in vLLM
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key="sekret").models.list().data


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerSettings(model_id="m").api_key == "from-env"
    assert ServerSettings(model_id="m", api_key="flag").api_key == "flag"


# ---- adapter paths over HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_tree(tiny_llama_dir, tmp_path_factory):
    """root/ (the allowed root) and outside/ (not allowed), each with a valid adapter."""
    base = tmp_path_factory.mktemp("fence")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    make_peft_adapter_dir(tiny_llama_dir, outside / "secret", seed=1, r=2, target_modules=["q_proj"])
    make_peft_adapter_dir(tiny_llama_dir, root / "good", seed=2, r=2, target_modules=["q_proj"])
    os.symlink(outside / "secret", root / "link-out")
    # A directory inside the root whose weights file links outside.
    (root / "sneaky").mkdir()
    shutil.copy(outside / "secret" / "adapter_config.json", root / "sneaky" / "adapter_config.json")
    os.symlink(outside / "secret" / "adapter_model.safetensors", root / "sneaky" / "adapter_model.safetensors")
    # Pickle weights only.
    (root / "pickled").mkdir()
    shutil.copy(outside / "secret" / "adapter_config.json", root / "pickled" / "adapter_config.json")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"not loaded anyway")
    return root, outside


@pytest.fixture(scope="module")
def fenced(make_server, adapter_tree):
    return make_server(adapter_roots=[adapter_tree[0]])


@pytest.mark.parametrize("path", ["../outside/secret", "{root}/../outside/secret", "{outside}/secret", "link-out",
                                  "{root}/link-out", "/etc", "sneaky"])
def test_paths_escaping_the_root_are_403(fenced, adapter_tree, path):
    root, outside = adapter_tree
    lora_path = path.format(root=root, outside=outside)
    error = assert_error(post(fenced, "/v1/load_lora_adapter", {"lora_name": "escape", "lora_path": lora_path}), 403,
                         type_="permission_error", param="lora_path")
    assert "outside the adapter roots" in error["message"]
    assert "escape" not in httpx.get(fenced.url + "/v1/models").text


def test_no_adapter_root_means_no_loading_over_http(server, adapter_tree):
    error = assert_error(post(server, "/v1/load_lora_adapter",
                              {"lora_name": "x", "lora_path": str(adapter_tree[0] / "good")}), 403)
    assert "--adapter-root" in error["message"]


def test_pickle_weights_are_refused(fenced):
    error = assert_error(post(fenced, "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "pickled"}), 400,
                         param="lora_path")
    assert "safetensors" in error["message"]


def test_load_unload_errors(fenced):
    assert_error(post(fenced, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "missing"}), 404)
    assert_error(post(fenced, "/v1/load_lora_adapter", {"lora_name": MODEL_ID, "lora_path": "good"}), 400,
                 param="lora_name")
    assert_error(post(fenced, "/v1/load_lora_adapter", {"lora_name": "has space", "lora_path": "good"}), 400)
    assert post(fenced, "/v1/load_lora_adapter", {"lora_name": "good-1", "lora_path": "good"}).status_code == 200
    assert_error(post(fenced, "/v1/load_lora_adapter", {"lora_name": "good-1", "lora_path": "good"}), 400,
                 code="adapter_exists")
    assert post(fenced, "/v1/unload_lora_adapter", {"lora_name": "good-1"}).status_code == 200
    assert_error(post(fenced, "/v1/unload_lora_adapter", {"lora_name": "good-1"}), 404, code="adapter_not_found")


# ---- a full queue --------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after(make_server):
    server = make_server(max_pending_requests=1)
    long_body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 400, "temperature": 0, "stream": True,
                 "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=long_body, timeout=120) as stream:
        assert stream.status_code == 200   # admitted: headers come once the first token exists
        response = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2})
        error = assert_error(response, 429, type_="rate_limit_error")
        assert response.headers["Retry-After"] == "1" and "capacity" in error["message"]
    # Closing the stream frees its slot.
    _wait_until(lambda: server.state.extras["gate"].num_in_flight == 0)
    assert post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_client_disconnect_aborts_the_request(server, backend):
    decoded = backend.llm.stats()["tokens_by_kind"]["decode"]
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
        assert stream.status_code == 200
    _wait_until(lambda: backend.llm.stats()["num_running"] == 0)
    assert backend.llm.stats()["tokens_by_kind"]["decode"] - decoded < 300


def test_concurrent_requests_beyond_the_limit_get_429(make_server):
    server = make_server(max_pending_requests=1)
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    statuses, lock = [], threading.Lock()

    def call():
        response = post(server, "/v1/completions", body)
        with lock:
            statuses.append((response.status_code, response.headers.get("Retry-After")))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (200, None) in statuses and (429, "1") in statuses, statuses
    assert {s for s, _ in statuses} <= {200, 429}


def _wait_until(predicate, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_error_body_is_json_for_every_status(server):
    response = httpx.put(server.url + "/v1/models")
    assert response.status_code == 405 and json.loads(response.text)["error"]["message"]
