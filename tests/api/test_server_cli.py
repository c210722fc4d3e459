"""`coserve serve` with its HTTP server: the real command in a subprocess, local and on Ray.

The ready line must carry the API's URL and mean requests are accepted; a
signal stops the HTTP server and then the engines; bad HTTP flags fail before
anything starts.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

COSERVE = str(Path(sys.executable).with_name("coserve"))
READY_TIMEOUT_S = 240
URL_RE = re.compile(r"at (http://127\.0\.0\.1:\d+)/v1")


def start_serve(tmp_path, *args, env=None):
    out = tmp_path / "serve.out"
    err = tmp_path / "serve.err"
    process = subprocess.Popen([COSERVE, "serve", *args], stdout=out.open("w"), stderr=err.open("w"),
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        match = URL_RE.search(out.read_text())
        if match:
            return process, match.group(1), out, err
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no ready line (exit {process.poll()}):\n{out.read_text()}\n{err.read_text()}")
        time.sleep(0.25)


def stop_serve(process, out, sig=signal.SIGINT) -> list[str]:
    process.send_signal(sig)
    assert process.wait(timeout=120) == 0
    return out.read_text().splitlines()


def test_serve_local_answers_openai_requests(tiny_llama_dir, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    process, url, out, err = start_serve(
        tmp_path, "--local", "--model", str(tiny_llama_dir), "--port", "0", "--adapter-root", str(root),
        "--device", "cpu", "--dtype", "float32", "--data-dir", str(tmp_path / "data"),
        env={"COSERVE_API_KEY": "k3y"})
    try:
        ready = out.read_text().splitlines()[0]
        assert ready.startswith("coserve local engine ready on cpu") and f"'{tiny_llama_dir.name}'" in ready
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401   # the key came from the environment
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list().data] == [tiny_llama_dir.name]
        out_ = client.completions.create(model=tiny_llama_dir.name, prompt="hello", max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert out_.usage.completion_tokens == 4
    finally:
        lines = stop_serve(process, out)
    assert lines[-2:] == ["coserve local engine: SIGINT received, shutting down", "coserve local engine stopped"]
    assert "Traceback" not in err.read_text()


@pytest.mark.parametrize("args, message", [
    (["--adapter-root", "/no/such/root"], "--adapter-root '/no/such/root' is not a directory"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-pending-requests", "0"], "max_pending_requests must be a positive integer"),
])
def test_bad_http_flags_fail_before_anything_starts(tiny_llama_dir, args, message):
    result = subprocess.run([COSERVE, "serve", "--local", "--model", str(tiny_llama_dir), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_busy_port_fails_naming_it(tiny_llama_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = subprocess.run([COSERVE, "serve", "--local", "--model", str(tiny_llama_dir), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr


@pytest.mark.ray_cluster   # its own embedded Ray in a subprocess: runs in the `-m ray_cluster` pass, alone
def test_serve_deployment_on_embedded_ray_over_http(tiny_llama_dir, tmp_path):
    """The cluster path: ClusterBackend over a real Deployment, streamed chunks through Ray."""
    process, url, out, err = start_serve(
        tmp_path, "--name", "http-test", "--model", str(tiny_llama_dir), "--port", "0", "--no-gpu",
        "--served-model-name", "tiny", "--directory", str(tmp_path / "dep"))
    try:
        assert re.search(r"ready: 1 worker\(s\) \[worker-0 on cpu[^\]]*\]; model 'tiny' at http://", out.read_text())
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=6, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        metrics = httpx.get(url + "/metrics").text
        assert 'coserve_tokens_total{engine="worker-0",kind="decode"}' in metrics
    finally:
        lines = stop_serve(process, out)
    assert lines[-2:] == ["coserve deployment 'http-test': SIGINT received, shutting down",
                          "coserve deployment 'http-test' stopped"]
