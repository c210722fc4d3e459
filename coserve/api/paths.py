"""Adapter paths that arrive over HTTP: resolve them and keep them inside the operator's roots.

A client names a directory; the server loads weights from it. Without a fence
that is a file-read primitive over the whole machine, so every such path is
resolved (symlinks followed, `..` collapsed) and must land inside one of
`ServerSettings.adapter_roots`. Paths given on the command line are the
operator's own and do not come through here.
"""
from __future__ import annotations

from pathlib import Path

from coserve.api.errors import APIError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ENABLE_HINT = "start the server with --adapter-root DIR (repeatable) to allow adapters under DIR"


def resolve_in_roots(raw: str, roots: list[Path], *, param: str = "lora_path") -> Path:
    """The real path of `raw` if it lies inside one of `roots` (already resolved), else APIError 403.

    Relative paths are taken relative to each root in turn (the first that exists wins).
    """
    if not roots:
        raise APIError(403, f"loading adapters over HTTP is disabled on this server: {ENABLE_HINT}",
                       param=param, code="adapter_roots_not_configured")
    if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
        raise APIError(400, f"{param} must be a non-empty path", param=param)
    given = Path(raw).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    chosen = next((c for c in candidates if c.exists()), candidates[0])
    try:
        # NOTE: resolve() follows every symlink and collapses `..`, so the containment test
        # below sees where the bytes really are, not what the string says.
        real = chosen.resolve(strict=False)
    except (OSError, RuntimeError) as exc:   # RuntimeError: a symlink loop
        raise APIError(400, f"{param} {raw!r} cannot be resolved: {exc}", param=param) from None
    if not _inside_any(real, roots):
        raise APIError(403, f"{param} {raw!r} resolves to {real}, which is outside the adapter roots this "
                            f"server allows ({', '.join(str(r) for r in roots)})",
                       param=param, code="path_outside_adapter_roots")
    return real


def check_adapter_dir(path: Path, roots: list[Path], *, param: str = "lora_path") -> None:
    """A PEFT adapter directory with safetensors weights, whose files do not point outside the roots.

    NOTE: the engine's loader still accepts `adapter_model.bin` (torch.load with weights_only=True);
    over HTTP we refuse anything but safetensors, so no pickle parser ever sees a client's file.
    """
    if not path.is_dir():
        raise APIError(404, f"adapter directory {path} does not exist", param=param, code="adapter_not_found")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        member = path / name
        if not member.is_file():
            hint = (" (this server loads safetensors weights only; adapter_model.bin is a pickle and is refused)"
                    if name == ADAPTER_WEIGHTS else "")
            raise APIError(400, f"adapter directory {path} has no {name}{hint}", param=param,
                           code="invalid_adapter")
        # A file inside the directory may itself be a symlink to somewhere else.
        if not _inside_any(member.resolve(), roots):
            raise APIError(403, f"{path / name} links outside the adapter roots this server allows",
                           param=param, code="path_outside_adapter_roots")


def _inside_any(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)
