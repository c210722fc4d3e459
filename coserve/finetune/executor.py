"""Torch side of finetuning inside one iteration: keep forward activations, run backward windows.

The runner's fused forward captures the rows of training chunks
(`ActivationCapture`); `record_forward` stores each chunk's layer inputs in its
sequence's buffers and computes the chunk's loss and final-state gradient.
`backward` runs one reverse token window (`sequence_backward_window`). Each
training sequence is registered with its targets, its trainable adapter and
its loss weight before its first chunk and released after its last window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coserve.finetune.backward import sequence_backward_window
from coserve.finetune.buffers import SequenceBuffers
from coserve.finetune.loss import IGNORE_INDEX, loss_and_grad
from coserve.finetune.trainable import TrainableLoRA
from coserve.models.attention import LayerKVCache
from coserve.models.llama import ActivationCapture, CausalLM, head_dim_of


@dataclass
class _Sequence:
    job_id: str
    targets: list[int]
    lora: TrainableLoRA
    loss_scale: float
    buffers: SequenceBuffers | None = None   # allocated at the first forward chunk


@dataclass
class ChunkLoss:
    loss_sum: float
    num_targets: int


class FinetuneExecutor:
    def __init__(self, model: CausalLM, kv_caches: list[LayerKVCache], block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self._sequences: dict[str, _Sequence] = {}

    def register(self, seq_id: str, targets: list[int], lora: TrainableLoRA, loss_scale: float,
                 job_id: str = "") -> None:
        """targets[i]: the id that must follow token i (-100: no loss at i)."""
        self._sequences[seq_id] = _Sequence(job_id, list(targets), lora, loss_scale)

    def _buffers(self, seq: _Sequence) -> SequenceBuffers:
        if seq.buffers is None:
            cfg = self.model.config
            seq.buffers = SequenceBuffers(cfg.num_hidden_layers, len(seq.targets), cfg.hidden_size,
                                          cfg.num_key_value_heads, head_dim_of(cfg), seq.targets, self.dtype,
                                          self.device)
        return seq.buffers

    def job_of(self, seq_id: str) -> str | None:
        seq = self._sequences.get(seq_id)
        return seq.job_id if seq is not None else None

    def release(self, seq_id: str) -> None:
        self._sequences.pop(seq_id, None)

    def release_job(self, job_id: str) -> None:
        for seq_id in [s for s, seq in self._sequences.items() if seq.job_id == job_id]:
            del self._sequences[seq_id]

    def sequence_bytes(self, seq_id: str) -> int:
        """Bytes this sequence's buffers hold now."""
        seq = self._sequences.get(seq_id)
        return seq.buffers.nbytes() if seq is not None and seq.buffers is not None else 0

    def held_bytes(self) -> int:
        """Bytes kept for backward by all registered sequences (K/V cache blocks not included)."""
        return sum(s.buffers.nbytes() for s in self._sequences.values() if s.buffers is not None)

    def record_forward(self, capture: ActivationCapture, chunks: list[tuple[str, int, int]],
                       sample_normed: torch.Tensor | None = None
                       ) -> tuple[dict[str, ChunkLoss], torch.Tensor | None]:
        """Store the captured rows of each chunk and compute the chunks' losses in one pass.

        Args:
            chunks: (seq_id, start position, num tokens) in the capture's row order.
            sample_normed: [m, hidden] final-norm rows of inference requests to sample; their logits
                come out of the same vocabulary projection as the losses.

        Returns:
            (loss per chunk's sequence, logits [m, vocab] of `sample_normed` or None).
        """
        targets, scales, row = [], [], 0
        for seq_id, start, num_tokens in chunks:
            seq = self._sequences[seq_id]
            buffers = self._buffers(seq)
            for index, layer_input in enumerate(capture.layer_inputs):
                buffers.layer_inputs[index, start:start + num_tokens] = layer_input[row:row + num_tokens]
            targets.append(buffers.targets[start:start + num_tokens])
            scales.append(torch.full((num_tokens,), seq.loss_scale, dtype=torch.float64, device=self.device))
            row += num_tokens
        result = loss_and_grad(self.model, capture.final_hidden, torch.cat(targets), torch.cat(scales),
                               sample_normed)
        losses, row = {}, 0
        for (seq_id, start, num_tokens), chunk_targets in zip(chunks, targets):
            self._sequences[seq_id].buffers.grad_final[start:start + num_tokens] = result.grad[row:row + num_tokens]
            num_targets = int((chunk_targets != IGNORE_INDEX).sum())
            losses[seq_id] = ChunkLoss(float(result.row_losses[row:row + num_tokens].sum()), num_targets)
            row += num_tokens
        return losses, result.extra_logits

    def backward(self, seq_id: str, start: int, end: int, block_ids: list[int], layer_start: int = 0,
                 layer_end: int | None = None, resume_cut: int | None = None, stop_cut: int | None = None) -> None:
        """Backward of tokens [start, end) of a sequence whose forward is complete (layers
        [layer_start, layer_end), and token cuts, for a piece of a window: see `BackwardWindow`)."""
        seq = self._sequences[seq_id]
        positions = torch.arange(end)
        table = torch.tensor(block_ids, dtype=torch.long)
        slots = (table[positions // self.block_size] * self.block_size + positions % self.block_size).to(self.device)
        sequence_backward_window(self.model, seq.lora, self._buffers(seq), self.kv_caches, slots, start, end,
                                 layer_start, layer_end, resume_cut, stop_cut)
