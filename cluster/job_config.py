"""Finetuning job configs from YAML, for `coserve finetune job.yaml`.

The file's keys are FinetuneConfig's fields; `peft:` holds peft.LoraConfig's
keyword arguments. Typos are refused by name rather than ignored, relative
paths are made absolute against the file's directory (workers may run with
another working directory), and every error names the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from coserve.config import FinetuneConfig

# Fields holding filesystem paths, resolved against the YAML file's directory.
# `resume_from_checkpoint` only where this FinetuneConfig has it.
_PATH_FIELDS = ("dataset", "init_adapter", "output_dir", "resume_from_checkpoint")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float, as YAML 1.2 does.

    NOTE: PyYAML follows YAML 1.1, where a float needs a dot, so
    `learning_rate: 1e-4` would load as the string "1e-4" and fail validation.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_job_config(source: str | os.PathLike | Mapping, **overrides) -> FinetuneConfig:
    """Builds a FinetuneConfig from a YAML file or a mapping.

    Args:
        source: a YAML file path, or a mapping with the same keys (its relative
            paths resolve against the current directory).
        overrides: field values that replace the file's (e.g. command-line
            flags); pass only the ones the user set. Their relative paths
            resolve against the current directory.
    Returns:
        The validated FinetuneConfig, with `peft` as a peft.LoraConfig.
    Raises:
        ValueError: missing or unreadable file, bad YAML, unknown fields, or a
            value FinetuneConfig rejects; the message starts with the file name.
    """
    if isinstance(source, Mapping):
        label, base_dir, values = "job config", Path.cwd(), dict(source)
    else:
        path = Path(source)
        label, base_dir, values = str(path), path.absolute().parent, _read_yaml(path)

    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig) if f.init}
    _check_known(label, values.keys() | overrides.keys(), fields, "FinetuneConfig")
    values = _resolve_paths(values, base_dir, fields)
    values.update(_resolve_paths(overrides, Path.cwd(), fields))

    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{label}: missing required field(s) {', '.join(map(repr, missing))}")
    if isinstance(values.get("peft"), Mapping):
        values["peft"] = _lora_config(label, values["peft"])
    elif values.get("peft") is not None and not hasattr(values["peft"], "to_dict"):
        raise ValueError(f"{label}: peft must be a mapping of peft.LoraConfig arguments, "
                         f"got {type(values['peft']).__name__}")
    try:
        return FinetuneConfig(**values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{label}: {error}") from error


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read: {error}") from error
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ValueError(f"{path}: expected a mapping of FinetuneConfig fields (adapter: ..., dataset: ...), "
                         f"got {got}")
    return data


def _check_known(label: str, keys, known: Mapping, what: str, prefix: str = "") -> None:
    unknown = sorted(str(key) for key in keys if key not in known)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(known), n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise ValueError(f"{label}: unknown {prefix}field(s) {', '.join(hints)}; "
                     f"{what} fields are: {', '.join(known)}")


def _resolve_paths(values: Mapping, base_dir: Path, fields: Mapping) -> dict:
    resolved = dict(values)
    for name in _PATH_FIELDS:
        value = resolved.get(name)
        # NOTE: only strings are paths; a dataset may also be an inline list of rows.
        if name in fields and isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            resolved[name] = os.path.normpath(path if path.is_absolute() else base_dir / path)
    return resolved


def _lora_config(label: str, raw: Mapping):
    # NOTE: peft pulls in torch and transformers; import it only when a job needs it.
    import peft

    known = {f.name: f for f in dataclasses.fields(peft.LoraConfig) if f.init}
    _check_known(label, raw.keys(), known, "peft.LoraConfig", prefix="peft ")
    try:
        return peft.LoraConfig(**raw)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{label}: peft: {error}") from error
