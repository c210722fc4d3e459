"""Find and read model checkpoints: HF directories and GGUF files.

`resolve_checkpoint` turns what a user passes (an HF model directory, a `.gguf`
file, or a directory holding exactly one `.gguf`) into a `ResolvedCheckpoint`:
a directory with config.json, its weight files and its tokenizer. GGUF files are
dequantized once into a plain HF directory in a cache and reused after that.
`iter_checkpoint_tensors` streams tensors from mmap'd safetensors (no copies);
the model module decides what to do with the names, which are HF's, untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
# NOTE: bump when the conversion output changes, so old cache entries are not reused.
_GGUF_CONVERSION_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint located on disk, ready to be read."""

    model_dir: Path
    """Directory holding config.json (for GGUF: the converted cache directory)."""
    weight_files: tuple[Path, ...]
    """Safetensors files (or `pytorch_model*.bin` for old checkpoints), in shard order."""
    tokenizer_dir: Path | None
    """Directory AutoTokenizer can load from; None when the checkpoint ships no tokenizer."""
    source: Path | None = None
    """What the user passed (the .gguf file for converted checkpoints)."""


def resolve_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> ResolvedCheckpoint:
    """Locate config, weights and tokenizer for `path`.

    Args:
        path: an HF model directory, a `.gguf` file, or a directory with exactly one `.gguf`.
        cache_dir: where GGUF conversions live; default `$COSERVE_CACHE/gguf`,
            else `~/.cache/coserve/gguf`.
    Raises:
        FileNotFoundError: the path does not exist or holds no weights.
        ValueError: ambiguous directory or unreadable weight files.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {source}")
    if source.is_file():
        if source.suffix != ".gguf":
            raise ValueError(f"checkpoint file {source} is not a .gguf file; pass an HF model directory instead")
        return _resolve_gguf(source, cache_dir)
    if (source / "config.json").is_file():
        return _resolve_hf_dir(source, source)
    ggufs = sorted(source.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_gguf(ggufs[0], cache_dir)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"directory {source} holds several .gguf files ({names}); pass one file path")
    raise FileNotFoundError(f"no checkpoint in {source}: expected config.json with weights, or a .gguf file")


def _resolve_hf_dir(model_dir: Path, source: Path) -> ResolvedCheckpoint:
    load_hf_config(model_dir)  # an unsupported architecture is the first thing to say
    weight_files = _find_weight_files(model_dir)
    for f in weight_files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    has_tokenizer = any((model_dir / name).is_file() for name in _TOKENIZER_FILES)
    return ResolvedCheckpoint(model_dir, weight_files, model_dir if has_tokenizer else None, source)


def _find_weight_files(model_dir: Path) -> tuple[Path, ...]:
    # Same preference order as transformers: sharded safetensors, single, then .bin.
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"corrupt shard index {index}: {e}") from e
            shards = tuple(model_dir / name for name in dict.fromkeys(weight_map.values()))
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"shard index {index} names missing file(s): {', '.join(missing)}")
            return shards
        if (model_dir / single_name).is_file():
            return (model_dir / single_name,)
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _check_safetensors(path: Path) -> None:
    # Reading the header is cheap and turns a corrupt file into an error that names it.
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {e}") from e


def _gguf_cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("COSERVE_CACHE") or "~/.cache/coserve"
    return Path(base).expanduser() / "gguf"


def gguf_cache_dir(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the HF conversion of `gguf_file` lives: `<stem>-<size>-<hash of mtime>`."""
    stat = Path(gguf_file).stat()
    digest = hashlib.sha1(f"{stat.st_mtime_ns}:{_GGUF_CONVERSION_VERSION}".encode()).hexdigest()[:12]
    return _gguf_cache_root(cache_dir) / f"{Path(gguf_file).stem}-{stat.st_size}-{digest}"


def _resolve_gguf(gguf_file: Path, cache_dir: str | os.PathLike | None) -> ResolvedCheckpoint:
    target = gguf_cache_dir(gguf_file, cache_dir)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp_dirs(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        logger.info("converting %s to a Hugging Face directory at %s (once; cached)", gguf_file, target)
        start = time.perf_counter()
        try:
            tmp.mkdir()
            _convert_gguf(gguf_file, tmp)
            try:
                os.rename(tmp, target)  # atomic: readers never see a half-written directory
            except OSError:
                if not target.is_dir():
                    raise
                # NOTE: another process finished the same conversion first; keep theirs.
        except Exception as e:
            raise RuntimeError(f"could not convert GGUF file {gguf_file}: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converted %s in %.1f s", gguf_file, time.perf_counter() - start)
    return _resolve_hf_dir(target, gguf_file)


def _remove_stale_tmp_dirs(target: Path) -> None:
    # A conversion killed midway leaves a ~0.5 GB temp dir; drop those whose process is gone.
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 2)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            pass  # not ours, or a live process of another user: leave it


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize `gguf_file` to fp32 and write config, safetensors and tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        from transformers import GgufConfig

        # NOTE: with the `kernels` package some transformers versions keep weights packed;
        # we want plain dense tensors that our own loader can read.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True, **kwargs
    )
    bad = {n for n, t in model.state_dict().items() if t.dtype != torch.float32}
    if bad:
        raise ValueError(f"dequantization left non-fp32 tensors: {sorted(bad)[:5]}")
    # The weights are dense now: drop the GGUF quantizer so save_pretrained accepts the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    stat = gguf_file.stat()
    provenance = {"source": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out_dir / "coserve_gguf_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def load_hf_config(model_dir: str | os.PathLike | ResolvedCheckpoint):
    """`AutoConfig` of a model directory, rejecting architectures coserve cannot run.

    Raises:
        ValueError: unreadable config, or a model_type other than llama/mistral/qwen2.
    """
    from transformers import AutoConfig

    if isinstance(model_dir, ResolvedCheckpoint):
        model_dir = model_dir.model_dir
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"corrupt model config {config_file}: {e}") from e
    # NOTE: checked on the raw JSON so that model types transformers does not know
    # get the same message as known-but-unsupported ones.
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (raw.get("architectures") or [model_type])[0] if isinstance(raw, dict) else None
        supported = ", ".join(SUPPORTED_MODEL_TYPES.values())
        raise ValueError(f"unsupported architecture '{arch}' (model_type '{model_type}'); supported: {supported}")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"cannot read model config {config_file}: {e}") from e


def iter_checkpoint_tensors(resolved: ResolvedCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor in the weight files, names as stored.

    Safetensors tensors are views of a private mmap of the file (no copy until
    written); `.bin` files are loaded with `torch.load(mmap=True)`.
    """
    for path in resolved.weight_files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"corrupt safetensors file {path}: {e}") from e
        else:
            yield from _load_bin(path).items()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        pass  # NOTE: mmap needs the zip format; files from torch < 1.6 fall back to a copy.
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad files
        raise ValueError(f"corrupt or unreadable weight file {path}: {e}") from e


def load_tokenizer(resolved: ResolvedCheckpoint):
    """The checkpoint's tokenizer via `AutoTokenizer`, from local files only."""
    from transformers import AutoTokenizer

    if resolved.tokenizer_dir is None:
        raise FileNotFoundError(f"checkpoint {resolved.model_dir} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(resolved.tokenizer_dir), local_files_only=True)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot load tokenizer from {resolved.tokenizer_dir}: {e}") from e
