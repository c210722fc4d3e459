"""Test helpers: run a coserve model forward outside the engine, on a private KV cache."""
from __future__ import annotations

import torch

from coserve.models.attention import allocate_kv_cache, build_attention_metadata
from coserve.models.llama import CausalLM, head_dim_of


class PagedRunner:
    """Feeds sequences chunk by chunk through `CausalLM` with a paged cache, returning all logits.

    Blocks are handed out interleaved across sequences (not contiguous) so the
    paged gather paths are exercised, or contiguous per sequence so the
    zero-copy view paths are.
    """

    def __init__(self, model: CausalLM, num_seqs: int, max_len: int, block_size: int = 4,
                 contiguous: bool = False) -> None:
        cfg = model.config
        blocks_per_seq = -(-max_len // block_size)
        self.block_size = block_size
        self.caches = allocate_kv_cache(cfg.num_hidden_layers, num_seqs * blocks_per_seq + 1, block_size,
                                        cfg.num_key_value_heads, head_dim_of(cfg),
                                        model.lm_head.weight.dtype, model.lm_head.weight.device)
        # Block 0 stays unused (padding); interleaved: sequence i gets blocks i+1, i+1+num_seqs, ...
        if contiguous:
            self.tables = [[1 + i * blocks_per_seq + j for j in range(blocks_per_seq)] for i in range(num_seqs)]
        else:
            self.tables = [[1 + i + j * num_seqs for j in range(blocks_per_seq)] for i in range(num_seqs)]
        self.positions = [0] * num_seqs
        self.model = model

    @torch.inference_mode()
    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """chunks: sequence index -> new token ids. Returns sequence index -> logits [n, vocab]."""
        order = list(chunks)
        ids, positions, seqs = [], [], []
        for i in order:
            n = len(chunks[i])
            ids += chunks[i]
            positions += range(self.positions[i], self.positions[i] + n)
            seqs.append((self.positions[i], n, self.tables[i]))
            self.positions[i] += n
        device = self.model.lm_head.weight.device
        meta = build_attention_metadata(seqs, self.block_size, self.model.sliding_window, device)
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                            self.caches, meta)
        logits = self.model.compute_logits(hidden).float()
        out, row = {}, 0
        for i in order:
            n = len(chunks[i])
            out[i] = logits[row:row + n]
            row += n
        return out


def make_peft_adapter_dir(model_dir, path, seed: int, scale: float = 0.1, **lora_kwargs):
    """Save a real peft LoRA adapter for the model in `model_dir`, with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(model, seed, scale)
    model.save_pretrained(str(path))
    return str(path)


def tiny_hf_llama(seed: int = 0):
    """A tiny fp64 transformers LlamaForCausalLM built in memory (hidden 64, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).double().eval()


def randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    """Give every LoRA A and B of a peft model seeded random values (peft starts B at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def make_peft_adapter(base, path, seed: int, **lora_kwargs):
    """A peft LoRA model on a copy of the in-memory `base`, random A and B, saved to `path`."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    randomize_lora(model, seed)
    model.save_pretrained(path)
    return model.eval()
