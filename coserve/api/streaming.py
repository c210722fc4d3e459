"""Streams of several sequences at once (n choices, many prompts), merged onto the event loop.

The backend's `generate_stream` is a blocking generator. Each sequence gets a
pump thread that iterates it and hands chunks to the loop through an asyncio
queue; the SSE response reads the queue. Closing the merge (client gone,
server stopping) tells every pump to stop at its next chunk, and a pump closes
its generator, which aborts the request in the engine.

`prime()` waits for every sequence's first item before the HTTP response
starts, so input the engine rejects still gets a proper 4xx status instead of
an error inside a 200 stream.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from coserve.engine.detokenizer import IncrementalDetokenizer
from coserve.outputs import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class Piece:
    """What one sequence produced since its last piece: new text, and the whole output when it ended."""

    index: int
    text: str
    output: RequestOutput | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None or self.error is not None


class MergedStreams:
    """Runs sequences' streams in threads; iterate it (async) for `Piece`s in arrival order."""

    def __init__(self, backend, sequences: list[tuple[list[int], object]], adapter: str | None) -> None:
        self._backend = backend
        self._sequences = sequences
        self._adapter = adapter
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self._buffer: list[Piece] = []
        self._num_open = len(sequences)
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._pump, args=(i, ids, params), daemon=True,
                                          name=f"coserve-stream-{i}")
                         for i, (ids, params) in enumerate(sequences)]
        for thread in self._threads:
            thread.start()

    async def prime(self) -> None:
        """Wait for each sequence's first piece; the first error found is raised (and everything stopped)."""
        started: set[int] = set()
        while len(started) < len(self._sequences):
            piece = await self._queue.get()
            self._buffer.append(piece)
            started.add(piece.index)
            if piece.error is not None:
                self.close()
                raise piece.error

    async def pieces(self):
        """Every piece (the primed ones first) until all sequences have ended."""
        try:
            for piece in self._buffer:
                yield piece
                self._num_open -= piece.finished
            self._buffer = []
            while self._num_open > 0:
                piece = await self._queue.get()
                yield piece
                self._num_open -= piece.finished
        finally:
            self.close()

    def close(self) -> None:
        """Stop every pump at its next chunk (idempotent; the pumps abort unfinished requests)."""
        self._stop.set()

    # ---- pump threads --------------------------------------------------------------------------

    def _pump(self, index: int, token_ids: list[int], params) -> None:
        detok = IncrementalDetokenizer(self._backend.tokenizer, params.stop)
        emitted = []
        stream = None
        try:
            stream = self._backend.generate_stream(token_ids, params, self._adapter)
            for chunk in stream:
                if chunk.output is not None:
                    text = "".join(emitted)
                    final = chunk.output.text
                    # NOTE: the engine's final text is authoritative; send whatever the incremental decode
                    # held back (a partial character, a possible stop-string prefix).
                    rest = final[len(text):] if final.startswith(text) else ""
                    self._put(Piece(index, rest, output=chunk.output))
                    return
                delta = detok.add_tokens(chunk.token_ids)
                if delta:
                    emitted.append(delta)
                self._put(Piece(index, delta))
                if self._stop.is_set():
                    return
            self._put(Piece(index, "", error=RuntimeError("the stream ended without a final output")))
        except BaseException as exc:   # reported to the client; the server keeps serving
            self._put(Piece(index, "", error=exc))
        finally:
            if stream is not None:
                try:
                    stream.close()   # aborts the request in the engine if it has not finished
                except Exception:
                    logger.exception("closing stream %d failed", index)

    def _put(self, piece: Piece) -> None:
        if self._stop.is_set() and not piece.finished:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, piece)
        except RuntimeError:   # the loop is closed: the server stopped, nobody reads any more
            self._stop.set()
