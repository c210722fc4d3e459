"""A live HTTP server (uvicorn in a thread) over a tiny local engine, for the `openai` client and raw HTTP.

`make_server(**settings)` starts one more server with other settings (API key,
limits); every server started is stopped at the end of the module.
"""
import pytest

from coserve import LLM
from coserve.api.app import create_app
from coserve.api.backend import LocalBackend
from coserve.api.server import HTTPServer
from coserve.api.settings import ServerSettings

ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64)
MODEL_ID = "tiny-llama"


class LiveServer(HTTPServer):
    """The app served by uvicorn on a free port of 127.0.0.1, started at construction."""

    def __init__(self, app) -> None:
        super().__init__(app, host="127.0.0.1", port=0)
        self.start()


@pytest.fixture(scope="module")
def backend(tiny_llama_dir):
    backend = LocalBackend(LLM(model=str(tiny_llama_dir), **ENGINE))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def make_server(backend, tmp_path_factory):
    servers = []

    def make(**settings) -> LiveServer:
        settings.setdefault("model_id", MODEL_ID)
        settings.setdefault("data_dir", tmp_path_factory.mktemp("server-data"))
        server = LiveServer(create_app(backend, ServerSettings(**settings)))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(make_server):
    """A server without auth, default limits."""
    return make_server()
