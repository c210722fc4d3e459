"""IncrementalDetokenizer: equals a full decode at every step; stop strings cut right."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from coserve.engine.detokenizer import IncrementalDetokenizer

SENTENCES = [
    "héllo wörld 東京 and hello world again",
    "the quick brown fox jumps over the lazy dog",
    "naïve café crème brûlée, 東京タワー 🚀 emoji",
    "Zürich, Kraków, São Paulo, 北京 and 大阪",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # A small byte-level BPE trained here (no hub): with 300 entries many
    # multi-byte characters stay split across tokens, which is the hard case.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)


def _byte_token_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split."""
    byte_to_char = dict(zip(range(256), _bytes_to_unicode()))
    return tokenizer.convert_tokens_to_ids([byte_to_char[b] for b in text.encode()])


def _bytes_to_unicode() -> list[str]:
    # GPT-2's byte -> printable char table that ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _check_stream(tokenizer, ids: list[int], chunk: int = 1, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, stop=[], skip_special_tokens=skip_special_tokens)
    streamed = ""
    for i in range(0, len(ids), chunk):
        streamed += detok.add_tokens(ids[i:i + chunk])
        full = tokenizer.decode(ids[:i + chunk], skip_special_tokens=skip_special_tokens)
        assert detok.text == full
        assert full.startswith(streamed)
        assert set(full[len(streamed):]) <= {"\ufffd"}  # only a maybe-incomplete character held
    assert streamed + detok.flush() == detok.text
    assert not detok.stopped


def test_tokenizer_splits_multibyte_characters(tokenizer):
    ids = tokenizer.encode(SENTENCES[0])
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 3])
def test_equals_full_decode_at_every_step(tokenizer, chunk):
    for text in SENTENCES[:4]:
        _check_stream(tokenizer, tokenizer.encode(text), chunk)
        _check_stream(tokenizer, _byte_token_ids(tokenizer, text), chunk)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_ids_match_full_decode(tokenizer, skip_special_tokens):
    # Random ids include lone continuation bytes, invalid sequences and <eos>.
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(len(tokenizer)) for _ in range(120)]
        _check_stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)


def test_long_run_of_split_characters_keeps_window_small(tokenizer):
    ids = _byte_token_ids(tokenizer, "東京大阪" * 50)
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    for i in ids:
        detok.add_tokens([i])
        assert len(detok.token_ids) - detok._prefix_offset <= 6
    assert detok.text == "東京大阪" * 50


def test_run_of_invalid_bytes_keeps_window_bounded(tokenizer):
    # A lone lead byte repeated (what a random tiny model may emit): the text
    # always ends in U+FFFD, yet every earlier byte is already final.
    ids = _byte_token_ids(tokenizer, "東")[:1] * 300 + tokenizer.encode(" ok")
    detok = IncrementalDetokenizer(tokenizer, stop=[])
    streamed = ""
    for n, i in enumerate(ids):
        streamed += detok.add_tokens([i])
        assert len(detok.token_ids) - detok._prefix_offset <= 16
        assert detok.text == tokenizer.decode(ids[:n + 1])
    assert streamed == detok.text == "\ufffd" * 300 + " ok"


def _stream_with_stop(tokenizer, ids, stop, chunk=1):
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    streamed = ""
    for i in range(0, len(ids), chunk):
        streamed += detok.add_tokens(ids[i:i + chunk])
        assert detok.text.startswith(streamed)
        if detok.stopped:
            break
    return detok, streamed


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("make_ids", ["encode", "bytes"])
def test_stop_string_across_token_boundaries(tokenizer, chunk, make_ids):
    text = "héllo wörld 東京 and hello world again"
    ids = tokenizer.encode(text) if make_ids == "encode" else _byte_token_ids(tokenizer, text)
    for stop, expected in [("wörld", "héllo "), ("京 an", "héllo wörld 東"),
                           ("lo w", "hél"), ("again", "héllo wörld 東京 and hello world ")]:
        detok, streamed = _stream_with_stop(tokenizer, ids, [stop, "never"], chunk)
        assert detok.stopped and detok.text == expected and streamed == expected
        assert detok.add_tokens(ids[:2]) == ""  # nothing after a stop


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps")
    detok, streamed = _stream_with_stop(tokenizer, ids, ["fox", "quick"], chunk=len(ids))
    assert detok.text == streamed == "the "


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    ids = tokenizer.encode("hello world again")
    detok = IncrementalDetokenizer(tokenizer, stop=["world peace"])
    streamed = ""
    for i in ids:
        streamed += detok.add_tokens([i])
        if detok.text.endswith("hello world"):
            assert streamed == "hello "  # "world" may begin "world peace"
    assert not detok.stopped and streamed == "hello world again"
    assert detok.flush() == ""
