"""Check an uploaded fine-tuning JSONL file line by line, naming every bad line and why.

A line must be a JSON object in a row shape the finetuning loader trains on
(coserve/finetune/dataset.py): OpenAI's chat fine-tuning format
{"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, {"text"}
or pre-tokenized {"input_ids"[, "labels"]}. The structural checks follow the
OpenAI format (roles, one assistant message at least); then each row goes
through the loader's own tokenizer path, so a row that uploads also trains.
Blank lines are skipped, as the loader skips them.
"""
from __future__ import annotations

import json

from coserve.finetune.dataset import DatasetError, tokenize_rows

MAX_REASONS = 20
"""Bad lines reported with their reason; further bad lines are only counted and numbered."""
MAX_EXTRA_LINE_NUMBERS = 50
CHAT_ROLES = ("system", "developer", "user", "assistant")
ROW_SHAPES = ('{"messages": [...]} (OpenAI chat fine-tuning format), {"prompt": ..., "completion": ...}, '
              '{"text": ...} or {"input_ids": [...]}')


class TrainingFileError(ValueError):
    """The file cannot be trained on; `bad_lines` are 1-based line numbers."""

    def __init__(self, message: str, bad_lines: list[int]) -> None:
        super().__init__(message)
        self.bad_lines = bad_lines


def validate_training_jsonl(data: bytes, filename: str, tokenizer, max_seq_len: int) -> list[dict]:
    """Parse and check every line; returns the rows, or raises TrainingFileError naming the bad lines.

    Args:
        tokenizer: the served model's tokenizer (chat rows need its chat template).
        max_seq_len: rows are tokenized as the loader does, truncated to this many tokens (a row with
            no target token left is bad).
    """
    rows: list[dict] = []
    errors: list[tuple[int, str]] = []
    # NOTE: split on b"\n" only, as the loader does: a JSON string may hold U+2028, which splitlines() breaks on.
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        if line_number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")   # a UTF-8 BOM, as the loader's utf-8-sig drops it
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            errors.append((line_number, f"not UTF-8 text (byte {err.start})"))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append((line_number, f"not valid JSON ({err.msg}, column {err.colno})"))
            continue
        problem = row_problem(row) or _tokenizer_problem(row, tokenizer, max_seq_len)
        if problem:
            errors.append((line_number, problem))
        else:
            rows.append(row)
    if errors:
        raise TrainingFileError(_describe(filename, errors, len(rows) + len(errors)), [n for n, _ in errors])
    if not rows:
        raise TrainingFileError(f"{filename!r} has no rows; each line must be one of {ROW_SHAPES}", [])
    return rows


def row_problem(row) -> str | None:
    """Why `row` is not a training row (structure only), or None. Shapes are tried in the loader's order."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if row.get("input_ids") is not None:
        return _token_ids_problem(row)
    if row.get("messages") is not None:
        return _chat_problem(row)
    if row.get("prompt") is not None or row.get("completion") is not None:
        for field in ("prompt", "completion"):
            if not isinstance(row.get(field), str):
                return f'"{field}" must be a string, got {_kind(row.get(field))}'
        return None
    if row.get("text") is not None:
        if not isinstance(row["text"], str) or not row["text"].strip():
            return '"text" must be a non-empty string'
        return None
    keys = ", ".join(f'"{key}"' for key in row) or "none"
    return f"no recognised fields (got {keys})"   # the error's last sentence lists the shapes


def _chat_problem(row: dict) -> str | None:
    for field in ("tools", "functions"):
        if row.get(field):
            return f'"{field}" (tool and function calling data) is not supported'
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role": ..., "content": ...} objects'
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is a JSON {type(message).__name__}, not an object"
        role = message.get("role")
        if role not in CHAT_ROLES:
            return f"message {i} has role {role!r}; supported roles: {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return (f'message {i} needs a string "content" (got {_kind(message.get("content"))}; '
                    "content parts, tool calls and null content are not supported)")
        if message.get("tool_calls") or message.get("function_call"):
            return f"message {i} has tool or function calls, which are not supported"
        if "weight" in message:
            weight = message["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                return f'message {i} has "weight" {weight!r}; it must be 0 or 1'
            if weight == 0:
                # NOTE: the loader trains on every assistant message; training a weight-0 one silently would lie.
                return f'message {i} has "weight": 0, which is not supported (every assistant message is trained on)'
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        return "no assistant message to learn from"
    return None


def _token_ids_problem(row: dict) -> str | None:
    for field in ("input_ids", "labels"):
        values = row.get(field)
        if values is None and field == "labels":
            continue
        if not isinstance(values, list) or not values:
            return f'"{field}" must be a non-empty list of integers'
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            return f'"{field}" must hold only integers'
    if min(row["input_ids"]) < 0:
        return '"input_ids" holds a negative token id'
    return None


def _tokenizer_problem(row: dict, tokenizer, max_seq_len: int) -> str | None:
    """What the loader says about this row (chat template, no target tokens, ...), or None."""
    try:
        tokenize_rows([row], tokenizer, max_seq_len)
    except DatasetError as err:
        # The loader lists bad rows as "  row <i>: <reason>"; with one row, take its reason.
        reasons = [line.split(": ", 1)[1] for line in str(err).splitlines() if line.lstrip().startswith("row 0:")]
        return reasons[0] if reasons else str(err)
    return None


def _describe(filename: str, errors: list[tuple[int, str]], num_lines: int) -> str:
    parts = [f"line {n}: {why}" for n, why in errors[:MAX_REASONS]]
    rest = [n for n, _ in errors[MAX_REASONS:]]
    message = (f"{filename!r}: {len(errors)} of {num_lines} lines are not valid training rows: "
               + "; ".join(parts))
    if rest:
        shown = ", ".join(str(n) for n in rest[:MAX_EXTRA_LINE_NUMBERS])
        more = f", ... ({len(rest) - MAX_EXTRA_LINE_NUMBERS} more)" if len(rest) > MAX_EXTRA_LINE_NUMBERS else ""
        message += f"; also bad: lines {shown}{more}"
    return message + f". Each line must be one JSON object: {ROW_SHAPES}."


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__
