"""Runs one scheduled iteration on the model: SchedulerOutput -> RunnerOutput.

The runner turns the scheduler's plain-Python plan into tensors (`ModelInput`),
puts the iteration's adapters into device slots, orders sequences so each
adapter's rows are contiguous (the grouped LoRA op then needs no gather), runs
one fused forward over every scheduled token, and samples the sequences that
reached their last known token. Finetuning forward chunks ride in the same
forward: their rows' activations are captured and handed to the
`FinetuneExecutor`, which keeps them and computes the chunk's loss. Per-request
sampling state (params, seeded generator) lives here, registered by the engine
when a request arrives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coserve.engine.adapter_manager import AdapterManager
from coserve.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from coserve.engine.sampler import Sampler, make_generator
from coserve.models.attention import AttentionMetadata, LayerKVCache, build_attention_metadata
from coserve.finetune.executor import FinetuneExecutor
from coserve.models.llama import ActivationCapture, CausalLM
from coserve.sampling_params import SamplingParams
from peft_methods.lora.layer import LoRABatch, LoRAContext

NO_ADAPTER_SLOT = -1


@dataclass
class ModelInput:
    input_ids: torch.Tensor         # [num_tokens] long
    positions: torch.Tensor         # [num_tokens] long
    attention: AttentionMetadata
    lora: LoRABatch
    sample_rows: torch.Tensor       # [num_sampled] long: last row of each sequence that samples
    sample_request_ids: list[str]
    training_rows: torch.Tensor     # [num_training_rows] long: rows of finetuning chunks
    training_chunks: list[tuple[str, int, int]]
    """(seq_id, start position, num tokens) of each finetuning chunk, in training_rows order."""


@dataclass
class _RequestState:
    params: SamplingParams
    generator: torch.Generator | None


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[LayerKVCache], block_size: int,
                 lora_context: LoRAContext, adapters: AdapterManager, device: torch.device,
                 finetune: FinetuneExecutor | None = None, decode_kernel=None) -> None:
        self.model = model
        self.finetune = finetune
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.lora_context = lora_context
        self.adapters = adapters
        self.device = device
        self.decode_kernel = decode_kernel
        """The CPU decode-attention kernel (`coserve.models.decode_attention`), or None: SDPA per decode."""
        self.sampler = Sampler()
        self._requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        self._requests[request_id] = _RequestState(params, generator)

    def remove_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    # NOTE: no_grad, not inference_mode: tensors kept for finetuning's backward must stay
    # ordinary tensors that autograd may read later.
    @torch.no_grad()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """The iteration's fused forward; samples and finetuning losses (backward windows run after)."""
        output = RunnerOutput()
        if not scheduler_output.sequences:
            return output
        model_input = self.prepare_input(scheduler_output.sequences)
        capture = ActivationCapture(model_input.training_rows) if model_input.training_chunks else None
        with self.lora_context.use(model_input.lora):
            hidden = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                                model_input.attention, capture)
        sample_hidden = hidden.index_select(0, model_input.sample_rows) if model_input.sample_request_ids else None
        logits = None
        if capture is not None:
            # NOTE: the sampled rows share the losses' vocabulary projection (one read of its weight).
            losses, logits = self.finetune.record_forward(capture, model_input.training_chunks, sample_hidden)
            output.training_losses = {sid: (loss.loss_sum, loss.num_targets) for sid, loss in losses.items()}
        if sample_hidden is None:
            return output
        if logits is None:
            logits = self.model.compute_logits(sample_hidden)
        logits = logits.float()
        states = [self._requests[rid] for rid in model_input.sample_request_ids]
        sampled = self.sampler(logits, [s.params for s in states], [s.generator for s in states])
        for rid, token, logprob in zip(model_input.sample_request_ids, sampled.token_ids, sampled.logprobs):
            output.sampled_token_ids[rid] = token
            if logprob is not None:
                output.logprobs[rid] = logprob
        return output

    def prepare_input(self, sequences: list[ScheduledSequence]) -> ModelInput:
        names = {s.adapter for s in sequences if s.adapter is not None}
        slot_of = self.adapters.activate(names) if names else {}
        slots = [slot_of[s.adapter] if s.adapter is not None else NO_ADAPTER_SLOT for s in sequences]
        # NOTE: a stable sort by slot makes each adapter's rows one contiguous segment.
        order = sorted(range(len(sequences)), key=lambda i: slots[i])
        input_ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        training_rows: list[int] = []
        training_chunks: list[tuple[str, int, int]] = []
        attn_seqs = []
        for i in order:
            seq, slot = sequences[i], slots[i]
            if seq.is_training:
                training_rows.extend(range(len(input_ids), len(input_ids) + seq.num_tokens))
                training_chunks.append((seq.request_id, seq.start_position, seq.num_tokens))
            input_ids.extend(seq.token_ids)
            positions.extend(range(seq.start_position, seq.start_position + seq.num_tokens))
            token_slots.extend([slot] * seq.num_tokens)
            if seq.needs_sample:
                sample_rows.append(len(input_ids) - 1)
                sample_ids.append(seq.request_id)
            attn_seqs.append((seq.start_position, seq.num_tokens, seq.block_ids))
        device = self.device
        return ModelInput(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            attention=build_attention_metadata(attn_seqs, self.block_size, self.model.sliding_window, device,
                                               decode_kernel=self.decode_kernel),
            lora=LoRABatch.from_slots(token_slots, device),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
            sample_request_ids=sample_ids,
            training_rows=torch.tensor(training_rows, dtype=torch.long, device=device),
            training_chunks=training_chunks,
        )
