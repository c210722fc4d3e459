"""Chat traffic through the OpenAI API, on background threads, with per-request latencies.

Each client streams chat completions one after another; TTFT is the time to
the first content chunk, TPOT the time per output token after it (the count
comes from the final usage chunk).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

QUESTIONS = [
    "What is the capital of France?",
    "Give me two tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Name two planets of the solar system.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer in one sentence.",
]


@dataclass
class Latency:
    start: float
    ttft_s: float
    tpot_s: float | None
    tokens: int


class ChatTraffic:
    def __init__(self, client, model: str, num_clients: int = 2, max_tokens: int = 48, think_s: float = 0.0) -> None:
        self.client = client
        self.think_s = think_s
        self.model = model
        self.max_tokens = max_tokens
        self.latencies: list[Latency] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._questions = itertools.cycle(QUESTIONS)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"demo-client-{i}", daemon=True)
                         for i in range(num_clients)]

    def start(self) -> "ChatTraffic":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def since(self, start: float) -> list[Latency]:
        with self._lock:
            return [lat for lat in self.latencies if lat.start >= start]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                question = next(self._questions)
            try:
                latency = self._one(question)
            except Exception as exc:  # shown in the summary; the traffic goes on
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)
                continue
            with self._lock:
                self.latencies.append(latency)
            self._stop.wait(self.think_s)

    def _one(self, question: str) -> Latency:
        start = time.monotonic()
        first = None
        tokens = 0
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": question}], max_tokens=self.max_tokens,
            temperature=0.7, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.monotonic()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.monotonic()
        first = first if first is not None else end
        tpot = (end - first) / (tokens - 1) if tokens > 1 else None
        return Latency(start, first - start, tpot, tokens)


def slo_attainment(latencies: list[Latency], ttft_slo_s: float, tpot_slo_s: float) -> float | None:
    if not latencies:
        return None
    met = sum(lat.ttft_s <= ttft_slo_s and (lat.tpot_s is None or lat.tpot_s <= tpot_slo_s) for lat in latencies)
    return met / len(latencies)
