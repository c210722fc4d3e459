"""Turns a request's output token ids into text as they arrive, and finds stop strings.

Decodes only a short window of recent tokens per step (vLLM's
`detokenize_incrementally`): tokens up to `read_offset` end on a character
boundary and their text is final; the window adds the previous chunk
(`prefix_offset`) as context so decoders that strip a leading space still
decode the next chunk right. Streamed text holds back a trailing incomplete
character and any suffix that may grow into a stop string.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"  # what decode gives for bytes that end mid-character
_NUM_BOUNDARY_CANDIDATES = 8  # token boundaries tried when the window grows


class IncrementalDetokenizer:
    """Per-request text state: `.text` equals decoding all ids at once, until a stop.

    Decodes with clean_up_tokenization_spaces=False (that clean-up rewrites text
    behind the cursor), so `.text` matches `tokenizer.decode` of tokenizers that
    do not clean up, such as byte-level BPE ones. Call `flush()` when a request
    ends without a stop string to release held-back text.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.stopped = False
        """True once a stop string appeared; `.text` then ends right before it."""
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""    # decode(token_ids[prefix_offset:read_offset])
        self._final_text = ""     # text of token_ids[:read_offset]; never changes
        self._pending_text = ""   # text of token_ids[read_offset:]; may end mid-character
        self._stop_cut: int | None = None  # len(.text) once stopped
        self._num_emitted = 0     # chars of .text already returned to the caller
        self._scan_at = _NUM_BOUNDARY_CANDIDATES

    @property
    def text(self) -> str:
        """Full output text so far (cut before the stop string once stopped)."""
        text = self._final_text + self._pending_text
        return text if self._stop_cut is None else text[:self._stop_cut]

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text that became safe to show since the last call."""
        if self.stopped or not new_token_ids:
            return ""
        num_checked = len(self._settled_text())  # chars already searched for stops
        self.token_ids.extend(new_token_ids)
        self._decode_window()
        cut = self._find_stop(self.text, num_checked)
        if cut is not None:
            self._stop_cut, self.stopped = cut, True
            return self._emit(cut)
        settled = self._settled_text()
        return self._emit(len(settled) - self._num_stop_prefix_chars(settled))

    def flush(self) -> str:
        """Return all held-back text; call when the request finishes for another reason."""
        return self._emit(len(self.text))

    def _settled_text(self) -> str:
        """`.text` without the trailing U+FFFD that more tokens may still complete."""
        return self._final_text + self._pending_text.rstrip(_REPLACEMENT)

    def _emit(self, end: int) -> str:
        delta = self.text[self._num_emitted:end]
        self._num_emitted = max(self._num_emitted, end)
        return delta

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end],
                                     skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_window(self) -> None:
        """Refresh `_pending_text`; move the offsets when the window ends on a boundary."""
        end = len(self.token_ids)
        pending = self._decode(self._prefix_offset)[len(self._prefix_text):]
        if pending and not pending.endswith(_REPLACEMENT):
            self._advance(end, pending)
            return
        self._pending_text = pending
        if end - self._read_offset >= self._scan_at:
            self._scan_for_boundary()

    def _scan_for_boundary(self) -> None:
        """Advance to a final boundary among the last few tokens, if there is one."""
        # NOTE: a run of tokens whose text ends in U+FFFD (split characters or,
        # from a random tiny model, invalid bytes) grows the window, and each
        # step decodes all of it. The scan keeps such runs linear; its interval
        # doubles while it finds nothing. (Runs of skipped special tokens still
        # grow the window: advancing past empty text would drop the context a
        # leading-space-stripping decoder needs.)
        end = len(self.token_ids)
        for boundary in range(end - 1, max(self._read_offset, end - _NUM_BOUNDARY_CANDIDATES), -1):
            chunk = self._final_chunk(boundary)
            if chunk is not None:
                self._advance(boundary, chunk)
                self._pending_text = self._decode(self._prefix_offset)[len(self._prefix_text):]
                return
        self._scan_at *= 2

    def _final_chunk(self, boundary: int) -> str | None:
        """Text of token_ids[read_offset:boundary] if no character straddles `boundary`.

        Decoding splits there iff decode(left) + decode(right) == decode(both):
        a character cut in two decodes to extra U+FFFD on one side or the other.
        """
        left = self._decode(self._prefix_offset, boundary)
        if len(left) <= len(self._prefix_text) or not left.startswith(self._prefix_text):
            return None
        if left + self._decode(boundary) != self._decode(self._prefix_offset):
            return None
        return left[len(self._prefix_text):]

    def _advance(self, boundary: int, chunk: str) -> None:
        """Make `chunk` (the text of token_ids[read_offset:boundary]) final."""
        self._final_text += chunk
        self._prefix_offset, self._read_offset = self._read_offset, boundary
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._pending_text = ""
        self._scan_at = _NUM_BOUNDARY_CANDIDATES

    def _find_stop(self, text: str, num_checked: int) -> int | None:
        """Start of the earliest stop string that ends past the checked chars."""
        starts = [text.find(s, max(0, num_checked - len(s) + 1)) for s in self.stop]
        starts = [i for i in starts if i >= 0]
        return min(starts) if starts else None

    def _num_stop_prefix_chars(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
