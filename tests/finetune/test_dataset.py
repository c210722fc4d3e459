"""Finetuning data: file formats, row formats and their labels, truncation, packing, step order, errors.

Expected ids come from calling the tiny tokenizer directly (or are written by
hand for pre-tokenized rows); expected target text for chat rows is the
assistant content plus the "<|im_end|>\\n" the ChatML template closes a turn with.
"""
import csv
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coserve.finetune.dataset import (
    IGNORE_INDEX,
    DatasetError,
    TrainingExample,
    load_rows,
    step_batches,
    tokenize_rows,
)
from coserve.models import build_tokenizer

ROWS = [
    {"text": "the quick brown fox"},
    {"prompt": "question: two plus two?", "completion": " four"},
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
]
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def targets(example: TrainingExample) -> list[int]:
    """Token ids the loss sees (labels[0] never is one)."""
    return [label for label in example.labels[1:] if label != IGNORE_INDEX]


def target_spans(example: TrainingExample) -> list[list[int]]:
    """Contiguous runs of target labels."""
    spans, current = [], []
    for label in example.labels[1:]:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- file formats


def test_jsonl_keeps_file_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    assert load_rows(path) == ROWS
    assert load_rows(str(path)) == ROWS


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    rows = [{"text": "one\u2028two\x85three"}]
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_rows(path) == rows
    csv_path = tmp_path / "sep.csv"
    csv_path.write_text("text\none\u2028two\n", encoding="utf-8")
    assert load_rows(csv_path) == [{"text": "one\u2028two"}]


@pytest.mark.parametrize("layout", ["list", "data", "lines"])
def test_json_layouts(tmp_path, layout):
    path = tmp_path / "data.json"
    if layout == "list":
        path.write_text(json.dumps(ROWS, indent=2))
    elif layout == "data":
        path.write_text(json.dumps({"data": ROWS}))
    else:
        write_jsonl(path, ROWS)
    assert load_rows(path) == ROWS


def test_json_single_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": CHAT}))
    assert load_rows(path) == [{"messages": CHAT}]


def test_csv_text_and_json_encoded_list_columns(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["say, \"hi\"", "hi\nthere"])
    assert load_rows(path) == [{"prompt": 'say, "hi"', "completion": "hi\nthere"}]

    path = tmp_path / "ids.csv"
    path.write_text('input_ids,labels\n"[1, 2, 3]","[-100, 2, 3]"\n')
    assert load_rows(path) == [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]


def test_csv_cell_larger_than_default_field_limit(tmp_path):
    long_text = "word " * 60_000  # 300 KB, over csv's default 128 KiB limit
    path = tmp_path / "long.csv"
    path.write_text(f"text\n{long_text}\n")
    limit_before = csv.field_size_limit()
    assert load_rows(path) == [{"text": long_text}]
    assert csv.field_size_limit() == limit_before


def test_parquet(tmp_path):
    rows = [{"text": "alpha"}, {"text": "beta"}]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_rows(path) == rows


def test_parquet_missing_column_values_read_as_absent(tmp_path, tok):
    # Parquet (like `datasets`) fills a column a row lacks with None.
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": ["alpha", None], "prompt": [None, "p"], "completion": [None, "c"]}), path)
    rows = load_rows(path)
    assert rows[0] == {"text": "alpha", "prompt": None, "completion": None}
    examples = tokenize_rows(rows, tok, 64)
    assert examples[0].input_ids == tok("alpha")["input_ids"] + [tok.eos_token_id]
    assert examples[1].labels[: len(tok("p")["input_ids"])] == [IGNORE_INDEX] * len(tok("p")["input_ids"])


def test_datasets_dataset_and_list(tok):
    rows = [{"text": "alpha"}, {"text": "beta"}]
    assert load_rows(datasets.Dataset.from_list(rows)) == rows
    assert load_rows(rows) == rows


# ---------------------------------------------------------------- row formats and labels


def test_text_row_trains_on_every_token_and_appends_eos(tok):
    (example,) = tokenize_rows([{"text": "the quick brown fox"}], tok, 64)
    expected = tok("the quick brown fox")["input_ids"] + [tok.eos_token_id]
    assert expected[0] == tok.bos_token_id
    assert example.input_ids == expected
    assert example.labels == expected
    assert example.num_targets == len(expected) - 1
    assert example.row == 0


def test_text_row_eos_not_doubled_and_optional(tok):
    (already_ends,) = tokenize_rows([{"text": "fox</s>"}], tok, 64)
    assert already_ends.input_ids == tok("fox</s>")["input_ids"]
    assert already_ends.input_ids[-1] == tok.eos_token_id
    (no_eos,) = tokenize_rows([{"text": "fox"}], tok, 64, add_eos=False)
    assert no_eos.input_ids == tok("fox")["input_ids"]


def test_prompt_completion_trains_on_completion_only(tok):
    prompt, completion = "question: two plus two?", " four"
    (example,) = tokenize_rows([{"prompt": prompt, "completion": completion}], tok, 64)
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example.input_ids == prompt_ids + completion_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert tok.decode(targets(example)) == " four</s>"


def test_chat_trains_on_assistant_turns_only(tok):
    (example,) = tokenize_rows([{"messages": CHAT}], tok, 256)
    assert example.input_ids == list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    spans = [tok.decode(span) for span in target_spans(example)]
    assert spans == ["hello there<|im_end|>\n", "ok<|im_end|>\n"]
    # The assistant header is context, not a target.
    text = tok.decode(example.input_ids)
    assert text.count("<|im_start|>assistant\n") == 2


def test_chat_without_chat_template_is_a_row_error(tok):
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(DatasetError, match=r"row 1: .*no chat template"):
        tokenize_rows([{"text": "fine"}, {"messages": CHAT}], plain, 64)


def test_chat_template_that_rewrites_earlier_turns_is_a_row_error(tok):
    rewriting = build_tokenizer()
    # The leading message count changes with every added message, so no render extends the previous one.
    rewriting.chat_template = (
        "{{ messages|length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DatasetError, match=r"row 0: .*rewrites earlier turns"):
        tokenize_rows([{"messages": CHAT}], rewriting, 256)


@pytest.mark.parametrize("messages, reason", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    ([{"role": "user"}], 'message 0 needs a string "content"'),
    ([{"role": "user", "content": "hi"}, "oops"], "message 1 is str"),
    ([{"role": "assistant", "content": "hi"}], "cannot render"),  # ChatML cannot render the empty conversation
    ([{"role": "user", "content": "hi"}], "no target tokens"),
])
def test_bad_chat_rows(tok, messages, reason):
    with pytest.raises(DatasetError) as info:
        tokenize_rows([{"messages": messages}], tok, 64)
    assert "row 0: " in str(info.value)
    assert reason in str(info.value)


def test_pretokenized_rows(tok):
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7]}]
    plain, masked = tokenize_rows(rows, tok, 64, vocab_size=8)
    assert (plain.input_ids, plain.labels, plain.num_targets) == ([5, 6, 7], [5, 6, 7], 2)
    assert (masked.input_ids, masked.labels, masked.num_targets) == ([5, 6, 7], [-100, -100, 7], 1)


def test_vocab_size_also_checks_tokenized_text(tok):
    ids = tok("the quick brown fox")["input_ids"]
    with pytest.raises(DatasetError, match=rf"row 0: token id {max(ids)} .* outside \[0, {max(ids)}\)"):
        tokenize_rows([{"text": "the quick brown fox"}], tok, 64, vocab_size=max(ids), add_eos=False)


# ---------------------------------------------------------------- truncation and packing


def test_truncation_keeps_the_first_max_seq_len_tokens(tok):
    text = "the quick brown fox jumps over the lazy dog"
    (example,) = tokenize_rows([{"text": text}], tok, 5)
    assert example.input_ids == tok(text)["input_ids"][:5]
    assert example.labels == example.input_ids


def test_packing_concatenates_rows_and_keeps_their_labels(tok):
    rows = [
        {"input_ids": [10, 11, 12]},
        {"input_ids": [20, 21], "labels": [IGNORE_INDEX, 21]},
        {"input_ids": [30, 31, 32, 33, 34]},
    ]
    packed = tokenize_rows(rows, tok, 4, packing=True)
    # Stream: ids 10 11 12 20 | 21 30 31 32 | 33 34; labels alike except 20 -> -100.
    assert [(e.input_ids, e.labels, e.row) for e in packed] == [
        ([10, 11, 12, 20], [10, 11, 12, IGNORE_INDEX], 0),
        ([21, 30, 31, 32], [21, 30, 31, 32], 1),
        ([33, 34], [33, 34], 2),
    ]


def test_packing_drops_sequences_without_targets(tok):
    rows = [
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [IGNORE_INDEX] * 5 + [6]},
        {"input_ids": [7, 8]},
    ]
    packed = tokenize_rows(rows, tok, 3, packing=True)
    # Chunks [1 2 3] (no target) dropped; [4 5 6]: target 6; [7 8]: target 8.
    assert [(e.input_ids, e.row) for e in packed] == [([4, 5, 6], 0), ([7, 8], 1)]


def test_packing_real_rows_matches_concatenation(tok):
    rows = [{"text": "alpha beta"}, {"prompt": "q", "completion": "a"}, {"text": "gamma"}]
    singles = tokenize_rows(rows, tok, 512)
    stream_ids = [t for e in singles for t in e.input_ids]
    stream_labels = [t for e in singles for t in e.labels]
    packed = tokenize_rows(rows, tok, 4, packing=True)
    assert all(len(e.input_ids) == 4 for e in packed[:-1])
    assert [t for e in packed for t in e.input_ids] == stream_ids  # no chunk dropped here
    assert [t for e in packed for t in e.labels] == stream_labels


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, None])
def test_max_seq_len_must_be_a_positive_int(tok, bad):
    with pytest.raises(ValueError, match="max_seq_len") as info:
        tokenize_rows([{"text": "x"}], tok, bad)
    assert not isinstance(info.value, DatasetError)


# ---------------------------------------------------------------- step order


def test_step_batches_in_file_order_wraps_epochs():
    assert step_batches(5, 3, 4, shuffle=False, seed=0) == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert step_batches(2, 5, 1, shuffle=False, seed=0) == [[0, 1, 0, 1, 0]]
    assert step_batches(5, 3, 0, shuffle=False, seed=0) == []


def test_step_batches_shuffled_is_a_fresh_permutation_per_epoch():
    rng = random.Random(7)
    stream = []
    for _ in range(3):
        epoch = list(range(5))
        rng.shuffle(epoch)
        stream += epoch
    steps = step_batches(5, 3, 4, shuffle=True, seed=7)
    assert steps == [stream[0:3], stream[3:6], stream[6:9], stream[9:12]]
    flat = [i for step in steps for i in step]
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5))
    assert step_batches(5, 3, 4, shuffle=True, seed=7) == steps
    assert step_batches(50, 10, 1, shuffle=True, seed=8) != step_batches(50, 10, 1, shuffle=True, seed=7)


@pytest.mark.parametrize("args", [(0, 1, 1), (3, 0, 1), (3, 1, -1), (3, True, 1)])
def test_step_batches_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        step_batches(*args, shuffle=False, seed=0)


def test_num_targets_ignores_the_first_label():
    assert TrainingExample([1, 2, 3], [1, IGNORE_INDEX, 3], row=0).num_targets == 1
    with pytest.raises(ValueError):
        TrainingExample([1, 2], [1], row=0)


# ---------------------------------------------------------------- errors


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.jsonl: no such file"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DatasetError, match=r"dir\.json: not a file"):
        load_rows(tmp_path / "dir.json")


def test_bad_jsonl_line_names_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_rows(path)


def test_bad_json_document_names_its_line_number(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DatasetError, match=r"bad\.json: line 3 is not valid JSON"):
        load_rows(path)
    write_jsonl(path, ROWS[:2])
    with path.open("a") as f:
        f.write("{oops\n")
    with pytest.raises(DatasetError, match=r"bad\.json: line 3 is not valid JSON"):
        load_rows(path)


def test_unsupported_extension_names_the_supported_ones(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    supported = r"\.jsonl, \.json, \.csv, \.parquet"
    with pytest.raises(DatasetError, match=rf"data\.txt: unsupported file type '\.txt'.*{supported}"):
        load_rows(path)


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", "\n\n"), ("empty.json", "[]"), ("empty.csv", "text\n"), ("data_empty.json", '{"data": []}'),
])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=rf"{name.replace('.', '[.]')}: the dataset is empty"):
        load_rows(path)


def test_corrupt_files(tmp_path):
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"bad\.parquet: not a readable Parquet file"):
        load_rows(parquet)
    short_line = tmp_path / "bad.csv"
    short_line.write_text("prompt,completion\na,b\nc\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: line 3 does not have the 2 fields"):
        load_rows(short_line)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.jsonl: not UTF-8"):
        load_rows(latin1)


def test_unreadable_sources():
    with pytest.raises(DatasetError, match="one split"):
        load_rows(datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}))
    with pytest.raises(DatasetError, match="cannot read a dataset from int"):
        load_rows(3)
    with pytest.raises(DatasetError, match="empty"):
        load_rows([])


def test_all_bad_rows_are_listed_with_their_numbers(tok):
    rows = [
        {"text": "fine"},
        {"prompt": "only a prompt"},
        "not a dict",
        {"txt": "typo"},
        {"text": 42},
        {"text": "   "},
        {"input_ids": [1, 2], "labels": [1]},
        {"input_ids": [1, 999]},
        {"input_ids": [1, 2], "labels": [1, 1000]},
        {"input_ids": [1, "2"]},
        {"prompt": "p", "completion": "", },
        {"input_ids": [1, 2], "labels": [1, IGNORE_INDEX]},
    ]
    with pytest.raises(DatasetError) as info:
        tokenize_rows(rows, tok, 64, vocab_size=999, add_eos=False, source_name="train.jsonl")
    lines = str(info.value).splitlines()
    assert lines[0] == "train.jsonl: 11 of 12 rows cannot be trained on (row numbers are 0-based):"
    expected = [
        'row 1: missing "completion"',
        "row 2: expected an object",
        'row 3: no recognised fields (got "txt"); expected "text", "prompt" + "completion", "messages"',
        'row 4: "text" must be a string, got int',
        'row 5: "text" is empty',
        'row 6: "labels" has 1 entries but "input_ids" has 2',
        "row 7: token id 999 at position 1 is outside [0, 999)",
        "row 8: label 1000 at position 1 is outside [0, 999)",
        "row 9: \"input_ids\"[1] is '2', not an int",
        "row 10: no target tokens",
    ]
    assert len(lines) == 1 + 10 + 1
    for line, start in zip(lines[1:], expected):
        assert line.strip().startswith(start), (line, start)
    assert lines[-1].strip() == "... and 1 more"


def test_zero_targets_after_truncation_names_max_seq_len(tok):
    prompt = "a long prompt that fills the whole window"
    assert len(tok(prompt)["input_ids"]) > 4
    with pytest.raises(DatasetError, match=r"row 0: no target tokens within the first max_seq_len=4 tokens"):
        tokenize_rows([{"prompt": prompt, "completion": "yes"}], tok, 4)
