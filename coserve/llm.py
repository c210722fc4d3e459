"""`LLM`: the offline Python entry point (vLLM-shaped), safe to call from many threads.

It owns an `Engine` and the `EngineLoop` that drives it (on the waiting caller's thread). `generate`
validates every prompt before queuing any, so one bad prompt rejects the call
without disturbing requests already running.
"""
from __future__ import annotations

import itertools
import time
from typing import Iterator, Sequence

from coserve.config import EngineConfig, FinetuneConfig
from coserve.engine.engine import Engine
from coserve.engine.loop import EngineLoop
from coserve.finetune.handle import FinetuneJobHandle
from coserve.outputs import RequestOutput, StreamChunk
from coserve.sampling_params import SamplingParams

_request_counter = itertools.count()
_STREAM_POLL_S = 0.005


class LLM:
    """Multi-LoRA generation on one model.

    Example:
        llm = LLM(model="path/to/model", max_loras=8, dtype="float32")
        llm.load_adapter("sql", "path/to/adapter")
        outs = llm.generate(["a", "b"], SamplingParams(max_tokens=32, temperature=0), adapter=["sql", None])
    """

    def __init__(self, model: str, *, caller_drives: bool = True, start_driver: bool = True, **kwargs) -> None:
        """kwargs: EngineConfig's fields. caller_drives=False steps the engine only on the loop's
        driver thread (for callers on a pool of threads, e.g. a Ray actor); start_driver=False leaves
        that thread to the owner, who calls `run_driver()` on it (see `EngineLoop`)."""
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = Engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._loop = EngineLoop(self.engine, caller_drives=caller_drives, start_driver=start_driver)

    def run_driver(self) -> None:
        """Step the engine on this thread until shutdown (only with start_driver=False)."""
        self._loop.run_driver()

    # ---- generation ----------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None | Sequence[str | None] = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; returns outputs in prompt order.

        Args:
            prompts: text prompt(s), tokenized with the model's tokenizer (special tokens added).
            sampling_params: one for all prompts or a list with one per prompt.
            adapter: one adapter name for all prompts, or a list with one per prompt; None = base model.
            prompt_token_ids: token ids instead of text prompts.
        """
        texts, token_ids = self._prompts(prompts, prompt_token_ids)
        params = self._per_prompt(sampling_params if sampling_params is not None else SamplingParams(),
                                  len(token_ids), "sampling_params", SamplingParams)
        adapters = self._per_prompt(adapter, len(token_ids), "adapter", (str, type(None)))
        ids = [f"gen-{next(_request_counter)}" for _ in token_ids]

        def add_all():
            # Validate everything first so a bad prompt queues nothing.
            for toks, p, a in zip(token_ids, params, adapters):
                self.engine.validate_request(toks, p, a)
            return [self._loop.track(self.engine.add_request(rid, toks, p, a, arrival_time=arrival))
                    for rid, toks, p, a in zip(ids, token_ids, params, adapters)]

        arrival = time.monotonic()   # the engine thread may add them an iteration later
        futures = self._loop.call(add_all)
        return [RequestOutput.from_request(self._loop.wait(f), text) for f, text in zip(futures, texts)]

    def generate_stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
               adapter: str | None = None, prompt_token_ids: Sequence[int] | None = None) -> Iterator[StreamChunk]:
        """Generate for one prompt, yielding new tokens as iterations produce them.

        The last chunk carries the whole RequestOutput. Bad input raises before the first chunk;
        closing the generator early aborts the request.
        """
        texts, token_ids = self._prompts(None if prompt is None else [prompt],
                                         None if prompt_token_ids is None else [prompt_token_ids])
        params = sampling_params if sampling_params is not None else SamplingParams()
        request_id = f"stream-{next(_request_counter)}"
        added = {}

        def add():
            self.engine.validate_request(token_ids[0], params, adapter)
            added["request"] = self.engine.add_request(request_id, token_ids[0], params, adapter,
                                                       arrival_time=arrival)
            return self._loop.track(added["request"])

        arrival = time.monotonic()
        future = self._loop.call(add)
        request, sent = added["request"], 0
        try:
            while not future.done():
                produced = request.output_token_ids[sent:]   # the engine only appends while running
                if produced:
                    sent += len(produced)
                    yield StreamChunk(list(produced))
                try:
                    self._loop.wait(future, timeout=_STREAM_POLL_S)
                except TimeoutError:
                    pass
            final = RequestOutput.from_request(future.result(), texts[0])
            yield StreamChunk(final.token_ids[sent:], final)
        finally:
            if not future.done():
                self._loop.call(lambda: self.engine.abort_request(request_id))

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, adapter=None) -> list[RequestOutput]:
        """Generate replies to chat conversations using the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_ids = [self.apply_chat_template(c) for c in conversations]
        return self.generate(sampling_params=sampling_params, adapter=adapter, prompt_token_ids=token_ids)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass plain prompts to generate()")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _prompts(self, prompts, prompt_token_ids) -> tuple[list[str | None], list[list[int]]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("prompts must be strings; use prompt_token_ids for token ids")
            return texts, [self.tokenizer(t)["input_ids"] for t in texts]
        token_ids = [list(t) for t in prompt_token_ids]
        return [None] * len(token_ids), token_ids

    @staticmethod
    def _per_prompt(value, count: int, name: str, kind) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
            values = list(value)
        else:
            values = [value] * count
        for v in values:
            if not isinstance(v, kind):
                raise TypeError(f"{name} entries must be {kind}, got {type(v).__name__}")
        return values

    # ---- finetuning -----------------------------------------------------------------------

    def finetune(self, config: FinetuneConfig, *, pause_at_step: int | None = None) -> FinetuneJobHandle:
        """Start training an adapter in the engine's iterations, next to inference; returns at once.

        Bad input (config, dataset rows, adapter name in use, ...) raises here and starts nothing.
        The job runs while any thread waits on the engine (generate, job.wait) or in the background.
        pause_at_step: pause once that many optimizer steps are done, until `job.continue_to(n)` (for
        drivers that act between steps, e.g. the Trainer's callbacks); None = run to the end.
        """
        # NOTE: reading and tokenizing the dataset happens on the caller's thread, not between iterations.
        job = self.engine.finetune.prepare(config)
        job.pause_at_step = pause_at_step
        self._loop.call(lambda: self.engine.finetune.submit(job))
        return FinetuneJobHandle(job, self._loop)

    def evaluate(self, dataset, adapter: str | None = None, *, max_seq_len: int = 256,
                 packing: bool = False) -> dict:
        """Mean token loss of `adapter` (None: the base model) on `dataset`, forward only.

        The loss is the finetuning loss (cross-entropy summed over every target token of every
        example, divided by their count); rows are read and tokenized as FinetuneConfig's dataset
        with the same max_seq_len and packing. Each batch of about max_num_batched_tokens tokens
        runs between iterations, so inference and finetuning go on in between.

        Returns:
            {"eval_loss": float, "num_tokens": target tokens, "num_examples": sequences}.
        """
        manager = self.engine.finetune
        examples = manager.prepare_eval(dataset, max_seq_len, packing)
        if adapter is not None and adapter not in self.list_adapters():
            raise ValueError(f"unknown adapter {adapter!r}; loaded adapters: {self.list_adapters()}")
        loss_sum, num_tokens = 0.0, 0
        for batch in _token_batches(examples, self.config.max_num_batched_tokens):
            batch_loss, batch_tokens = self._loop.call(lambda b=batch: manager.eval_batch(adapter, b))
            loss_sum += batch_loss
            num_tokens += batch_tokens
        return {"eval_loss": loss_sum / max(1, num_tokens), "num_tokens": num_tokens, "num_examples": len(examples)}

    def finetune_jobs(self) -> list[dict]:
        return self._loop.call(lambda: [j.progress() for j in self.engine.finetune.jobs.values()])

    # ---- adapters and state --------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        self._loop.call(lambda: self.engine.load_adapter(name, path))

    def unload_adapter(self, name: str) -> None:
        self._loop.call(lambda: self.engine.unload_adapter(name))

    def list_adapters(self) -> list[str]:
        return self._loop.call(self.engine.list_adapters)

    def save_adapter(self, name: str, path: str) -> None:
        """Write adapter `name` (its current weights, also mid-training) to `path` in PEFT format."""
        self._loop.call(lambda: self.engine.adapters.save(name, path))

    def stats(self) -> dict:
        return self._loop.call(self.engine.get_stats)

    def shutdown(self) -> None:
        self._loop.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _token_batches(examples: list, max_tokens: int) -> list[list]:
    """Consecutive examples grouped up to `max_tokens` tokens (an example longer than that goes alone)."""
    batches, current, size = [], [], 0
    for example in examples:
        n = len(example.input_ids)
        if current and size + n > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(example)
        size += n
    if current:
        batches.append(current)
    return batches
