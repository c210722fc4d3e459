"""The engine core: owns model, KV cache, adapters, scheduler, runner and finetuning jobs.

Single-threaded by design (DESIGN section 2): one caller drives `step()`.
`step()` is schedule -> execute (fused forward, then finetuning backward
windows) -> update, then the output side: stop strings, detokenization,
clean-up of finished requests and finetuning bookkeeping (optimizer steps).
`LLM` wraps it with a loop for thread-safe use.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from coserve.config import EngineConfig, FinetuneConfig
from coserve.engine.adapter_manager import AdapterManager, UnknownAdapterError
from coserve.engine.budget import configure_budget
from coserve.engine.cost_model import IterationShape
from coserve.engine.detokenizer import IncrementalDetokenizer
from coserve.engine.gc_heap import freeze_existing_heap
from coserve.engine.kv_cache import BlockManager
from coserve.engine.outputs import RunnerOutput
from coserve.engine.request import Request, RequestStatus
from coserve.engine.runner import ModelRunner
from coserve.engine.scheduler import Scheduler
from coserve.engine.stats import EngineStats
from coserve.finetune.executor import FinetuneExecutor
from coserve.finetune.job import FinetuneJob
from coserve.finetune.manager import FinetuneManager
from coserve.graph import inject_adapters, prune_backward
from coserve.models.attention import allocate_kv_cache, kv_cache_bytes_per_block
from coserve.models.checkpoint import load_tokenizer, resolve_checkpoint
from coserve.models.decode_attention import load_decode_kernel
from coserve.models.llama import head_dim_of
from coserve.models.loader import load_model
from coserve.sampling_params import SamplingParams
from peft_methods.lora.layer import LoRAContext

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        freeze_existing_heap()   # full collections while serving then skip the imported heap
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype(self.device)
        self.checkpoint = resolve_checkpoint(config.model)
        self.tokenizer = load_tokenizer(self.checkpoint)
        self.model = load_model(self.checkpoint, self.dtype, self.device)
        self.model.requires_grad_(False)   # base weights are frozen; only LoRA weights train
        model_config = self.model.config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = getattr(model_config, "eos_token_id", None)

        self.lora_context = LoRAContext(use_ref=config.use_lora_ref, use_cpu_kernel=self.device.type == "cpu")
        self.model.use_cpu_kernel(self.lora_context.cpu_kernel)   # the vocabulary projection's few-row path
        self.inject_report = inject_adapters(self.model, "all-linear", config.max_loras, self.lora_context,
                                             shared_input_groups=self.model.SHARED_INPUT_LINEARS)
        self.adapters = AdapterManager(self.model, self.lora_context, config.max_loras, config.max_lora_rank,
                                       config.max_cpu_loras, self.device, self.dtype)

        num_blocks = self._num_kv_blocks()
        self.kv_caches = allocate_kv_cache(model_config.num_hidden_layers, num_blocks, config.block_size,
                                           model_config.num_key_value_heads, head_dim_of(model_config),
                                           self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler_config(), self.block_manager)
        self.scheduler.finetune.num_layers = len(self.model.model.layers)   # backward may run in layer pieces
        self.prune_report = prune_backward(self.model, self.dtype, config.block_size)
        executor = FinetuneExecutor(self.model, self.kv_caches, config.block_size, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv_caches, config.block_size, self.lora_context,
                                  self.adapters, self.device, finetune=executor,
                                  decode_kernel=self._decode_kernel())
        self.finetune = FinetuneManager(self.model, self.tokenizer, self.adapters, self.scheduler.finetune, executor,
                                        self.max_model_len, self.prune_report.kv_bytes_per_block, config.block_size)
        self.stats = EngineStats()
        self.budget = configure_budget(self)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens", config.model, self.device,
                    self.dtype, num_blocks, config.block_size)

    def _decode_kernel(self):
        """The CPU decode-attention kernel for fp32 on a CPU, else None (SDPA per decode)."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        kernel, why_not = load_decode_kernel()
        logger.info("decode attention: %s", "one CPU kernel call per layer" if kernel is not None
                    else f"SDPA per decode ({why_not})")
        return kernel

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        mc = self.model.config
        per_block = kv_cache_bytes_per_block(mc.num_hidden_layers, cfg.block_size, mc.num_key_value_heads,
                                             head_dim_of(mc), self.dtype)
        # Enough for every running sequence at full length, capped by the memory budget.
        wanted = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        budget = int(cfg.kv_cache_memory_gb * 2**30) // per_block
        return max(1, min(wanted, budget))

    # ---- requests -------------------------------------------------------------------------

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams,
                         adapter: str | None) -> None:
        """Raise a clear error for input the engine cannot serve; changes nothing."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; the model's maximum length is "
                             f"{self.max_model_len}, leaving no room to generate")
        if adapter is not None and not self.adapters.has(adapter):
            raise UnknownAdapterError(f"unknown adapter {adapter!r}; loaded adapters: {self.adapters.names()}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, arrival_time: float | None = None) -> Request:
        """Queue a request. `arrival_time` (time.monotonic() seconds, as vLLM's) is when it reached the
        server: requests submitted from other threads wait for the engine thread, and the TTFT target
        counts from their arrival. None: now; a time in the future counts as now."""
        self.validate_request(prompt_token_ids, params, adapter)
        now = time.monotonic()
        if arrival_time is not None and not (isinstance(arrival_time, (int, float)) and math.isfinite(arrival_time)):
            raise ValueError(f"arrival_time must be a finite time.monotonic() value, got {arrival_time!r}")
        request = Request(request_id, list(prompt_token_ids), params, adapter=adapter,
                          eos_token_id=self.eos_token_id, max_model_len=self.max_model_len,
                          arrival_time=now if arrival_time is None else min(float(arrival_time), now))
        self.runner.add_request(request_id, params)
        if params.stop:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add_request(request)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        request = self.scheduler.abort_request(request_id)
        self._release(request_id)
        return request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One iteration; returns the requests that finished in it."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            finished = self.scheduler.update(scheduler_output, RunnerOutput())
        else:
            start = time.perf_counter()
            try:
                runner_output = self.runner.execute(scheduler_output)
            except Exception as exc:  # one bad batch must not stop the engine
                logger.exception("iteration failed; failing its requests")
                return self._fail_batch(scheduler_output, exc)
            self.finetune.run_backward(scheduler_output.backward_windows)
            finished = self.scheduler.update(scheduler_output, runner_output)
            self.finetune.after_iteration(scheduler_output, runner_output)
            seconds = time.perf_counter() - start
            self.stats.record_iteration(scheduler_output, seconds)
            self.scheduler.cost_model.observe(IterationShape.of(scheduler_output), seconds)
        finished += self._check_stop_strings(scheduler_output)
        for request in finished:
            self._finalize(request)
        return finished

    def _check_stop_strings(self, scheduler_output) -> list[Request]:
        stopped = []
        for seq in scheduler_output.sequences:
            detok = self._detokenizers.get(seq.request_id)
            request = self.scheduler.get_request(seq.request_id)
            if detok is None or request is None or request.is_finished or not seq.needs_sample:
                continue
            detok.add_tokens(request.output_token_ids[len(detok.token_ids):])
            if detok.stopped:
                self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED)
                stopped.append(request)
        return stopped

    def _fail_batch(self, scheduler_output, exc: Exception) -> list[Request]:
        failed = []
        training = [s.request_id for s in scheduler_output.sequences if s.is_training]
        training += [w.seq_id for w in scheduler_output.backward_windows]
        self.finetune.fail_sequences(training, f"iteration failed: {type(exc).__name__}: {exc}")
        for seq in scheduler_output.sequences:
            if seq.is_training:
                continue
            request = self.scheduler.get_request(seq.request_id)
            if request is None or request.is_finished:
                continue
            request.error = f"{type(exc).__name__}: {exc}"
            self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_ERROR)
            self._finalize(request)
            failed.append(request)
        return failed

    def _finalize(self, request: Request) -> None:
        detok = self._detokenizers.get(request.request_id)
        if detok is not None:
            detok.add_tokens(request.output_token_ids[len(detok.token_ids):])
            request.output_text = detok.text
        else:
            request.output_text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        self.stats.record_finished(request)
        self._release(request.request_id)

    def _release(self, request_id: str) -> None:
        self.runner.remove_request(request_id)
        self._detokenizers.pop(request_id, None)

    # ---- adapters ------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        self.adapters.register(name, path)

    def unload_adapter(self, name: str) -> None:
        training = [j.job_id for j in self.finetune.jobs.values() if j.adapter == name and not j.is_finished]
        if training:
            raise ValueError(f"adapter {name!r} is being trained by job {training[0]}; cancel the job first")
        in_use = sum(1 for r in self.scheduler.requests.values() if r.adapter == name)
        if in_use:
            raise ValueError(f"adapter {name!r} is in use by {in_use} unfinished request(s); "
                             "unload it when they finish")
        self.adapters.unregister(name)

    def list_adapters(self) -> list[str]:
        return self.adapters.names()

    # ---- finetuning ----------------------------------------------------------------------

    def add_finetune_job(self, config: FinetuneConfig) -> FinetuneJob:
        """Check and start a finetuning job (engine thread; `LLM.finetune` prepares off it)."""
        return self.finetune.submit(self.finetune.prepare(config))

    def cancel_finetune_job(self, job_id: str) -> bool:
        return self.finetune.cancel(job_id)

    def get_stats(self) -> dict:
        stats = self.stats.snapshot(self.scheduler, self.block_manager)
        stats["budget"] = self.budget.to_dict(self.scheduler)
        stats["latency_profile"] = self.budget.profile
        stats["adapters"] = self.adapters.residency()
        stats["finetune"] = self.finetune.stats()
        stats["finetune"]["planned_saved_bytes_per_token"] = self.prune_report.bytes_per_token
        stats["finetune"]["recomputed"] = self.prune_report.recomputed
        return stats
