"""Finetuning data: read rows, turn them into token sequences with labels, order them into steps.

`load_rows` reads JSONL / JSON / CSV / Parquet files, a `datasets.Dataset` or a
list of dicts. `tokenize_rows` accepts four row formats ("text", "prompt" +
"completion", chat "messages", pre-tokenized "input_ids" with optional
"labels"), checks every row and reports all bad rows in one `DatasetError`.
Labels follow the Hugging Face convention (`labels[i]` is the label of token i,
`IGNORE_INDEX` = no loss). `step_batches` says which examples each optimizer step
uses. Pure Python: no torch.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
ROW_FORMATS = '"text", "prompt" + "completion", "messages", or "input_ids" (+ optional "labels")'
MAX_LISTED_ERRORS = 10
# CSV cells are strings; these columns may hold JSON-encoded lists.
_JSON_LIST_COLUMNS = ("input_ids", "labels", "messages")


class DatasetError(ValueError):
    """A dataset that cannot be read, or rows that cannot be trained on; the message names the file and the rows."""


@dataclass
class TrainingExample:
    """One training sequence.

    `labels[i]` is the label of token i: the model predicts token i from tokens
    before it, so the target at position i-1 is `labels[i]`; `labels[0]` is
    never a target. `IGNORE_INDEX` marks tokens with no loss.
    """

    input_ids: list[int]
    labels: list[int]
    """Same length as `input_ids`."""
    row: int
    """Index of the source row (for a packed sequence, the row of its first token)."""

    def __post_init__(self):
        if len(self.labels) != len(self.input_ids):
            raise ValueError(f"labels has {len(self.labels)} entries, input_ids {len(self.input_ids)}")

    @property
    def num_targets(self) -> int:
        """Tokens the loss sees: `labels[1:]` entries that are not `IGNORE_INDEX`."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


class _RowError(Exception):
    """Why one row cannot be trained on; collected and reported together."""


# ---------------------------------------------------------------- loading


def load_rows(source) -> list[dict]:
    """Read every row of a dataset.

    Args:
        source: a path (str / PathLike) to a .jsonl, .json, .csv or .parquet file,
            a `datasets.Dataset`, or a list of dicts. A .json file holds a list of
            objects, `{"data": [...]}`, or JSON lines.
    Returns:
        The rows, in file order. Rows are not validated here (`tokenize_rows` does).
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source))
    if isinstance(source, Mapping):
        raise DatasetError("got a mapping (a DatasetDict?); pass one split, e.g. dataset['train']")
    if isinstance(source, (list, tuple)):
        rows = list(source)
    elif hasattr(source, "to_list"):  # datasets.Dataset, without importing `datasets`
        rows = source.to_list()
    else:
        raise DatasetError(f"cannot read a dataset from {type(source).__name__}; expected a path, "
                           "a datasets.Dataset or a list of dicts")
    if not rows:
        raise DatasetError("the dataset is empty")
    return rows


def _load_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DatasetError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                           f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file")
    try:
        if suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            text = path.read_text(encoding="utf-8-sig")
            readers = {".jsonl": _read_json_lines, ".json": _read_json, ".csv": _read_csv}
            rows = readers[suffix](path, text)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err})") from err
    if not rows:
        raise DatasetError(f"{path}: the dataset is empty")
    return rows


def _read_json(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a first value followed by more: JSON lines
            return _read_json_lines(path, text)
        raise DatasetError(f"{path}: line {err.lineno} is not valid JSON ({err.msg}, column {err.colno})") from err
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    return [data]  # one JSON line


def _read_json_lines(path: Path, text: str) -> list:
    rows = []
    # NOTE: not splitlines(): JSON strings may hold a raw U+2028, which it treats as a line break.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: line {line_number} is not valid JSON ({err.msg}, column {err.colno})") from err
    return rows


def _read_csv(path: Path, text: str) -> list[dict]:
    old_limit = csv.field_size_limit()
    # NOTE: the default 128 KiB cell limit is below a long document; restore the global afterwards.
    csv.field_size_limit(2**31 - 1)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for row in reader:
            if None in row or None in row.values():
                raise DatasetError(f"{path}: line {reader.line_num} does not have the "
                                   f"{len(reader.fieldnames)} fields of the header")
            rows.append({key: _decode_json_cell(key, value) for key, value in row.items()})
        return rows
    except csv.Error as err:
        raise DatasetError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from err
    finally:
        csv.field_size_limit(old_limit)


def _decode_json_cell(column: str, value: str):
    if column not in _JSON_LIST_COLUMNS or not value.lstrip().startswith("["):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # reported by row validation as a wrong type


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{path}: not a readable Parquet file ({err})") from err


# ---------------------------------------------------------------- tokenizing


def tokenize_rows(rows: list[dict], tokenizer, max_seq_len: int, *, packing: bool = False,
                  vocab_size: int | None = None, add_eos: bool = True,
                  source_name: str = "dataset") -> list[TrainingExample]:
    """Validate and tokenize every row, then truncate or pack to `max_seq_len`.

    Without packing each row is one sequence, keeping its first `max_seq_len`
    tokens. With packing, rows are concatenated in order and cut into sequences
    of exactly `max_seq_len` tokens (the last may be shorter). Labels are
    concatenated as given: the first token of a row is a target only if its own
    row labels it (a text row's BOS is, a prompt's first token is not), and no
    other cross-row target is invented. Attention is not masked at row
    boundaries. The first token of each packed sequence cannot be a target (no
    context), and packed sequences left with no target are dropped.

    Args:
        vocab_size: when given, every token id and label must lie in [0, vocab_size).
        add_eos: append the tokenizer's EOS to text rows and completions (chat rows end as the
            template renders them; pre-tokenized rows are taken as given).
        source_name: names the data in error messages (e.g. the file path).
    Raises:
        DatasetError: listing every bad row (0-based row numbers) and their count.
        ValueError: `max_seq_len` is not a positive int.
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    if not rows:
        raise DatasetError(f"{source_name}: the dataset is empty")
    examples, errors = [], []
    for row_index, row in enumerate(rows):
        try:
            examples.append(_row_example(row, row_index, tokenizer, max_seq_len, packing, vocab_size, add_eos))
        except _RowError as err:
            errors.append((row_index, str(err)))
    if errors:
        raise DatasetError(_describe_row_errors(source_name, errors, len(rows)))
    if not packing:
        return examples
    packed = _pack(examples, max_seq_len)
    if not packed:
        raise DatasetError(f"{source_name}: packing to max_seq_len={max_seq_len} left no sequence with a target")
    return packed


def _row_example(row, row_index: int, tokenizer, max_seq_len: int, packing: bool,
                 vocab_size: int | None, add_eos: bool) -> TrainingExample:
    input_ids, labels = _tokenize_row(row, tokenizer, add_eos)
    _check_ids_in_range(input_ids, labels, vocab_size)
    if not packing:  # packing splits long rows across sequences instead
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    example = TrainingExample(input_ids, labels, row_index)
    if example.num_targets == 0:
        truncated = "" if packing else f" within the first max_seq_len={max_seq_len} tokens"
        raise _RowError(f"no target tokens{truncated} (every label is {IGNORE_INDEX} after the first token)")
    return example


def _describe_row_errors(source_name: str, errors: list[tuple[int, str]], num_rows: int) -> str:
    lines = [f"{source_name}: {len(errors)} of {num_rows} rows cannot be trained on (row numbers are 0-based):"]
    lines += [f"  row {row}: {message}" for row, message in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    return "\n".join(lines)


def _present(row: dict, key: str) -> bool:
    # NOTE: `datasets` and Parquet fill a column missing from a row with None.
    return row.get(key) is not None


def _tokenize_row(row, tokenizer, add_eos: bool) -> tuple[list[int], list[int]]:
    """The row's (input_ids, labels), before truncation; formats are tried in this order."""
    if not isinstance(row, dict):
        raise _RowError(f"expected an object with {ROW_FORMATS}, got {type(row).__name__}")
    if _present(row, "input_ids"):
        return _pretokenized_row(row)
    if _present(row, "messages"):
        return _chat_row(row["messages"], tokenizer)
    if _present(row, "prompt") or _present(row, "completion"):
        return _prompt_completion_row(row, tokenizer, add_eos)
    if _present(row, "text"):
        return _text_row(row["text"], tokenizer, add_eos)
    keys = ", ".join(f'"{key}"' for key in row if _present(row, key)) or "none"
    raise _RowError(f"no recognised fields (got {keys}); expected {ROW_FORMATS}")


def _require_string(value, field: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f'"{field}" must be a string, got {type(value).__name__}')
    return value


def _encode(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _with_eos(ids: list[int], tokenizer, add_eos: bool) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        return ids + [eos]
    return ids


def _text_row(text, tokenizer, add_eos: bool) -> tuple[list[int], list[int]]:
    if not _require_string(text, "text").strip():
        raise _RowError('"text" is empty')
    ids = _with_eos(_encode(tokenizer, text), tokenizer, add_eos)
    return ids, list(ids)


def _prompt_completion_row(row: dict, tokenizer, add_eos: bool) -> tuple[list[int], list[int]]:
    for field in ("prompt", "completion"):
        if not _present(row, field):
            raise _RowError(f'missing "{field}"')
    prompt_ids = _encode(tokenizer, _require_string(row["prompt"], "prompt"))
    completion = _require_string(row["completion"], "completion")
    completion_ids = _with_eos(_encode(tokenizer, completion, add_special_tokens=False), tokenizer, add_eos)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _pretokenized_row(row: dict) -> tuple[list[int], list[int]]:
    input_ids = _int_list(row["input_ids"], "input_ids")
    if not input_ids:
        raise _RowError('"input_ids" is empty')
    if not _present(row, "labels"):
        return input_ids, list(input_ids)
    labels = _int_list(row["labels"], "labels")
    if len(labels) != len(input_ids):
        raise _RowError(f'"labels" has {len(labels)} entries but "input_ids" has {len(input_ids)}')
    return input_ids, labels


def _int_list(values, field: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise _RowError(f'"{field}" must be a list of ints, got {type(values).__name__}')
    for position, value in enumerate(values):
        # NOTE: bool is an int subclass, and `True` as a token id is a bug.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _RowError(f'"{field}"[{position}] is {value!r}, not an int')
    return [int(value) for value in values]


def _check_ids_in_range(input_ids: list[int], labels: list[int], vocab_size: int | None) -> None:
    upper = vocab_size if vocab_size is not None else float("inf")
    for position, token in enumerate(input_ids):
        if not 0 <= token < upper:
            raise _RowError(f"token id {token} at position {position} is outside [0, {vocab_size or 'inf'})")
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX and not 0 <= label < upper:
            raise _RowError(f"label {label} at position {position} is outside [0, {vocab_size or 'inf'}) "
                            f"and is not {IGNORE_INDEX}")


# ---------------------------------------------------------------- chat


def _chat_row(messages, tokenizer) -> tuple[list[int], list[int]]:
    """Render with the chat template; only the tokens each assistant message adds are targets.

    The conversation is rendered one message longer at a time. The tokens an
    assistant message adds after its header (the render of the earlier messages
    with `add_generation_prompt=True`) are targets; everything else is not.
    This needs each render to extend the previous one token for token.
    """
    _check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise _RowError('"messages" needs a chat template, and the tokenizer has no chat template')
    ids: list[int] = []  # render of messages[:i]
    labels: list[int] = []
    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        header = ids
        if is_assistant:
            header = _render(tokenizer, messages[:i], add_generation_prompt=True, index=i)
            _require_prefix(ids, header, i)
        rendered = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, index=i)
        _require_prefix(header, rendered, i)
        added = rendered[len(header):]
        labels += [IGNORE_INDEX] * (len(header) - len(ids))
        labels += added if is_assistant else [IGNORE_INDEX] * len(added)
        ids = rendered
    return ids, labels


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise _RowError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RowError(f"message {i} is {type(message).__name__}, not an object")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise _RowError(f'message {i} needs a string "{field}"')


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool, index: int) -> list[int]:
    try:
        result = tokenizer.apply_chat_template(messages, tokenize=True,
                                               add_generation_prompt=add_generation_prompt)
    except Exception as err:  # templates raise anything (jinja errors, ValueError for "empty conversation")
        raise _RowError(f"the chat template cannot render messages[:{len(messages)}] "
                        f"(for message {index}): {err}") from err
    # transformers 5 returns a BatchEncoding; older versions a list of ids.
    ids = result["input_ids"] if isinstance(result, Mapping) else result
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(token) for token in ids]


def _require_prefix(prefix: list[int], ids: list[int], index: int) -> None:
    if ids[: len(prefix)] != prefix:
        raise _RowError(f"the chat template rewrites earlier turns when message {index} is added, "
                        "so the assistant tokens cannot be located")


# ---------------------------------------------------------------- packing and ordering


def _pack(examples: list[TrainingExample], max_seq_len: int) -> list[TrainingExample]:
    input_ids, labels, starts = [], [], []
    for example in examples:
        starts.append(len(input_ids))
        input_ids += example.input_ids
        labels += example.labels
    packed = []
    for begin in range(0, len(input_ids), max_seq_len):
        owner = examples[bisect.bisect_right(starts, begin) - 1].row
        sequence = TrainingExample(input_ids[begin: begin + max_seq_len], labels[begin: begin + max_seq_len], owner)
        if sequence.num_targets > 0:
            packed.append(sequence)
    return packed


def step_batches(num_examples: int, examples_per_step: int, max_steps: int, *,
                 shuffle: bool, seed: int) -> list[list[int]]:
    """Example indices for each optimizer step 0..max_steps-1.

    Examples are consumed in order (`shuffle=False`) or in a permutation drawn
    with `random.Random(seed)`; when they run out a new epoch starts (a fresh
    permutation from the same generator when shuffling), so a step may span two
    epochs. Each step gets exactly `examples_per_step` indices.
    """
    for name, value, minimum in (("num_examples", num_examples, 1),
                                 ("examples_per_step", examples_per_step, 1), ("max_steps", max_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return list(iter_step_batches(num_examples, examples_per_step, max_steps, shuffle=shuffle, seed=seed))


def iter_step_batches(num_examples: int, examples_per_step: int, max_steps: int | None = None, *,
                      shuffle: bool, seed: int) -> Iterator[list[int]]:
    """`step_batches`, one step at a time (a long job never holds its whole plan); None = forever."""
    indices = _epochs(num_examples, shuffle, random.Random(seed))
    step = 0
    while max_steps is None or step < max_steps:
        yield [next(indices) for _ in range(examples_per_step)]
        step += 1


def _epochs(num_examples: int, shuffle: bool, rng: random.Random) -> Iterator[int]:
    """Example indices forever, one epoch after another."""
    while True:
        order = list(range(num_examples))
        if shuffle:
            rng.shuffle(order)
        yield from order
