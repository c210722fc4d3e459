"""Token-window backward equals a full-sequence backward.

Op level (fp64, to 1e-9): one decoder layer's windowed backward with dK/dV
accumulators against plain autograd over the whole sequence. Model level:
the sequence's forward in chunks through the paged engine model (other rows in
the same batch), then reverse windows with recomputation, against Hugging Face
transformers + peft on the whole sequence.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from coserve.engine.training_sequence import next_piece
from coserve.finetune.executor import FinetuneExecutor
from coserve.finetune.trainable import TrainableLoRA
from coserve.graph import inject_adapters
from coserve.models.attention import allocate_kv_cache, build_attention_metadata
from coserve.models.llama import ActivationCapture, head_dim_of
from coserve.models.loader import load_model
from coserve.models.checkpoint import resolve_checkpoint
from peft_methods.lora.layer import LoRABatch, LoRAContext
from peft_methods.lora.weights import load_adapter
from tests.helpers import make_peft_adapter_dir

BLOCK = 4
IGNORE = -100


def _peft_reference_grads(model_dir, adapter_dir, sequences, scale):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    for module in base.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _wide_rms_norm(module)     # HF's norm rounds to fp32 even in fp64
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    total = 0.0
    for tokens, targets in sequences:
        logits = model(input_ids=torch.tensor([tokens])).logits[0].double()
        total = total + F.cross_entropy(logits, torch.tensor(targets), ignore_index=IGNORE, reduction="sum")
    (total * scale).backward()
    grads = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            grads.setdefault(module, {})["A" if ".lora_A." in name else "B"] = param.grad
    return float(total.detach()), grads


def _wide_rms_norm(module):
    def forward(hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden * torch.rsqrt(variance + module.variance_epsilon))
    return forward


class _ChunkedTrainer:
    """Runs training sequences through the engine model the way the runner does, outside the engine."""

    def __init__(self, model_dir, adapter_dir, max_len):
        self.model = load_model(resolve_checkpoint(str(model_dir)), torch.float64, torch.device("cpu"))
        self.model.requires_grad_(False)
        self.context = LoRAContext()
        inject_adapters(self.model, "all-linear", 2, self.context, self.model.SHARED_INPUT_LINEARS)
        adapter = load_adapter(adapter_dir)
        self.lora = TrainableLoRA.from_adapter(adapter, torch.device("cpu"), dtype=torch.float64)
        self.linears = {n: m for n, m in self.model.named_modules() if hasattr(m, "set_slot")}
        for name, (a, b) in adapter.weights.items():
            self.linears[name].set_slot(0, a.double(), b.double(), adapter.config.scaling_for(name))
        cfg = self.model.config
        blocks = 4 * (-(-max_len // BLOCK)) + 1
        self.caches = allocate_kv_cache(cfg.num_hidden_layers, blocks, BLOCK, cfg.num_key_value_heads,
                                        head_dim_of(cfg), torch.float64, torch.device("cpu"))
        self.executor = FinetuneExecutor(self.model, self.caches, BLOCK, torch.float64, torch.device("cpu"))
        self.tables = {}
        self._next_block = 1

    def add(self, seq_id, tokens, targets, scale, interleave_with=None):
        num_blocks = -(-len(tokens) // BLOCK)
        self.tables[seq_id] = list(range(self._next_block, self._next_block + num_blocks))
        self._next_block += num_blocks
        self.executor.register(seq_id, targets, self.lora, scale)

    def forward(self, chunks, tokens_of, extra_rows=None):
        """chunks: list of (seq_id, start, n), all in one fused forward; extra_rows: an unrelated prefill."""
        ids, positions, attn, slots = [], [], [], []
        for seq_id, start, n in chunks:
            ids += tokens_of[seq_id][start:start + n]
            positions += range(start, start + n)
            attn.append((start, n, self.tables[seq_id]))
            slots += [0] * n
        num_train_rows = len(ids)
        if extra_rows is not None:
            ids += extra_rows
            positions += range(len(extra_rows))
            attn.append((0, len(extra_rows), self.tables["extra"]))
            slots += [1] * len(extra_rows)
        meta = build_attention_metadata(attn, BLOCK, self.model.sliding_window, torch.device("cpu"))
        capture = ActivationCapture(rows=torch.arange(num_train_rows))
        with torch.no_grad(), self.context.use(LoRABatch.from_slots(slots)):
            self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta, capture)
        return self.executor.record_forward(capture, chunks)[0]

    def grads(self):
        return {name: {"A": a.grad, "B": b.grad} for name, (a, b) in self.lora.params.items()}


def _make_sequences(vocab, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        tokens = torch.randint(3, vocab, (n,), generator=gen).tolist()
        targets = tokens[1:] + [IGNORE]
        targets[: n // 4] = [IGNORE] * (n // 4)       # a prompt part without loss
        seqs.append((tokens, targets))
    return seqs


def _chunked_grads(model_dir, adapter_dir, sequences, scale, chunk, window, pieces):
    """Loss sum and LoRA gradients of `sequences` through the engine path: forward in chunks of
    `chunk` tokens, backward in reverse windows of `window` tokens, each window run as `pieces`:
    None, one call; ("layers", k): layer windows of k layers, top-down, one call each (as the planner
    does when a whole window does not fit an iteration); ("tokens", u): pieces of u tokens of layer
    work each, which cut layers by tokens. Also returns how many pieces cut a layer."""
    trainer = _ChunkedTrainer(model_dir, adapter_dir, max_len=64)
    tokens_of = {}
    for i, (tokens, targets) in enumerate(sequences):
        trainer.add(f"s{i}", tokens, targets, scale)
        tokens_of[f"s{i}"] = tokens
    # An inference prefill with another adapter slot shares the first forward.
    trainer.tables["extra"] = list(range(trainer._next_block, trainer._next_block + 4))
    loss_sum, done = 0.0, {sid: 0 for sid in tokens_of}
    first = True
    while any(done[sid] < len(tokens_of[sid]) for sid in done):
        chunks = []
        for sid in done:
            n = min(chunk, len(tokens_of[sid]) - done[sid])
            if n:
                chunks.append((sid, done[sid], n))
                done[sid] += n
        losses = trainer.forward(chunks, tokens_of, extra_rows=[5, 6, 7, 8, 9] if first else None)
        first = False
        loss_sum += sum(v.loss_sum for v in losses.values())
    num_layers = trainer.model.config.num_hidden_layers
    cut_pieces = 0
    for sid, tokens in tokens_of.items():
        end = len(tokens)
        while end > 0:
            start = max(0, end - window)
            if pieces is None:
                trainer.executor.backward(sid, start, end, trainer.tables[sid])
            elif pieces[0] == "layers":
                top = None
                while top != 0:
                    bottom = max(0, (num_layers if top is None else top) - pieces[1])
                    trainer.executor.backward(sid, start, end, trainer.tables[sid], bottom, top)
                    top = bottom
            else:
                top, cut = num_layers, None
                while top or cut is not None:
                    piece = next_piece(start, end, num_layers, top, cut, pieces[1])
                    trainer.executor.backward(sid, start, end, trainer.tables[sid], piece.layer_start,
                                              piece.layer_end, piece.resume_cut, piece.stop_cut)
                    cut_pieces += piece.resume_cut is not None or piece.stop_cut is not None
                    top, cut = piece.layer_start, piece.stop_cut
            end = start
    return loss_sum, trainer.grads(), cut_pieces


@pytest.mark.parametrize("chunk,window,pieces", [(5, 3, None), (7, 13, None), (64, 64, None),
                                                 (7, 13, ("layers", 1)), (5, 9, ("layers", 2)),
                                                 (7, 13, ("tokens", 5)), (5, 9, ("tokens", 11)),
                                                 (64, 64, ("tokens", 40))])
def test_chunked_forward_and_windowed_backward_equal_full_sequence(tiny_model_dir, tmp_path, chunk, window,
                                                                    pieces):
    adapter_dir = make_peft_adapter_dir(tiny_model_dir, tmp_path / "adapter", seed=1, r=4, lora_alpha=8,
                                        target_modules="all-linear")
    sequences = _make_sequences(AutoConfig.from_pretrained(tiny_model_dir).vocab_size, [23, 17], seed=2)
    num_targets = sum(sum(t != IGNORE for t in targets) for _, targets in sequences)
    scale = 1.0 / num_targets
    ref_loss, ref_grads = _peft_reference_grads(tiny_model_dir, adapter_dir, sequences, scale)
    loss_sum, ours, cut_pieces = _chunked_grads(tiny_model_dir, adapter_dir, sequences, scale, chunk, window,
                                                pieces)
    assert pieces is None or pieces[0] == "layers" or cut_pieces, "some piece should have cut a layer"

    assert loss_sum == pytest.approx(ref_loss, rel=1e-9)
    assert set(ours) == set(ref_grads)
    for module, pair in ref_grads.items():
        for which in ("A", "B"):
            # NOTE: transformers keeps fp32 islands even in an fp64 model (rotary tables, SDPA's
            # scaling), so against it 1e-6 is the honest bound; the op-level tests are 1e-9.
            torch.testing.assert_close(ours[module][which], pair[which], rtol=1e-6, atol=1e-8,
                                       msg=lambda m, module=module, which=which: f"{module} lora_{which}: {m}")


def test_sliding_window_backward_equals_full_sequence(tmp_path):
    """A Mistral sliding window shorter than the sequences: windows and cut pieces see only the keys
    the window lets each query see, as transformers does over the whole sequence."""
    from coserve.models.presets import make_model_dir, tiny_config

    model_dir = make_model_dir(tmp_path / "mistral-sw", tiny_config("mistral", sliding_window=6), seed=4)
    adapter_dir = make_peft_adapter_dir(model_dir, tmp_path / "adapter", seed=5, r=4, lora_alpha=8,
                                        target_modules="all-linear")
    sequences = _make_sequences(AutoConfig.from_pretrained(model_dir).vocab_size, [23, 17], seed=8)
    ref_loss, ref_grads = _peft_reference_grads(model_dir, adapter_dir, sequences, 0.05)
    loss_sum, ours, cut_pieces = _chunked_grads(model_dir, adapter_dir, sequences, 0.05, 7, 13, ("tokens", 5))
    assert cut_pieces
    assert loss_sum == pytest.approx(ref_loss, rel=1e-9)
    for module, pair in ref_grads.items():
        for which in ("A", "B"):
            torch.testing.assert_close(ours[module][which], pair[which], rtol=1e-6, atol=1e-8,
                                       msg=lambda m, module=module, which=which: f"{module} lora_{which}: {m}")


@pytest.mark.parametrize("window,layer_tokens", [(13, 5), (9, 11), (23, 30)])
def test_token_cut_pieces_equal_whole_windows_fp64(tiny_llama_dir, tmp_path, window, layer_tokens):
    """Cutting layers by tokens only regroups the same fp64 operations: equal to 1e-9."""
    adapter_dir = make_peft_adapter_dir(tiny_llama_dir, tmp_path / "adapter", seed=6, r=4, lora_alpha=8,
                                        target_modules="all-linear")
    sequences = _make_sequences(AutoConfig.from_pretrained(tiny_llama_dir).vocab_size, [23, 17], seed=7)
    _, whole, _ = _chunked_grads(tiny_llama_dir, adapter_dir, sequences, 0.05, 7, window, None)
    _, cut, cut_pieces = _chunked_grads(tiny_llama_dir, adapter_dir, sequences, 0.05, 7, window,
                                        ("tokens", layer_tokens))
    assert cut_pieces
    for module, pair in whole.items():
        for which in ("A", "B"):
            torch.testing.assert_close(cut[module][which], pair[which], rtol=1e-9, atol=1e-12)


def _full_layer_output(layer, prefix, lora_of, x, cos, sin):
    """Plain full-sequence forward of one decoder layer with LoRA, for autograd."""
    attn, mlp = layer.self_attn, layer.mlp

    def linear(module, inp, name):
        base = module.base_layer
        out = F.linear(inp, base.weight, base.bias)
        lora = lora_of(f"{prefix}.{name}")
        if lora is not None:
            out = out + lora[2] * (inp @ lora[0].T) @ lora[1].T
        return out

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, None]

    n = x.shape[0]
    h = layer.input_layernorm(x)
    q = rope(linear(attn.q_proj, h, "self_attn.q_proj").view(n, attn.num_heads, attn.head_dim))
    k = rope(linear(attn.k_proj, h, "self_attn.k_proj").view(n, attn.num_kv_heads, attn.head_dim))
    v = linear(attn.v_proj, h, "self_attn.v_proj").view(n, attn.num_kv_heads, attn.head_dim)
    group = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * attn.scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
    x = x + linear(attn.o_proj, out, "self_attn.o_proj")
    m = layer.post_attention_layernorm(x)
    act = F.silu(linear(mlp.gate_proj, m, "mlp.gate_proj")) * linear(mlp.up_proj, m, "mlp.up_proj")
    return x + linear(mlp.down_proj, act, "mlp.down_proj")


@pytest.mark.parametrize("window", [1, 4, 7, 19])
def test_layer_window_backward_equals_full_sequence_fp64(tiny_llama_dir, tmp_path, window):
    from coserve.finetune.backward import layer_backward

    adapter_dir = make_peft_adapter_dir(tiny_llama_dir, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                                        target_modules="all-linear")
    trainer = _ChunkedTrainer(tiny_llama_dir, adapter_dir, max_len=32)
    model, layer = trainer.model, trainer.model.model.layers[1]
    gen = torch.Generator().manual_seed(4)
    length, hidden = 19, model.config.hidden_size
    x = torch.randn(length, hidden, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(length, hidden, generator=gen, dtype=torch.float64)
    cos, sin = model.rotary(torch.arange(length), torch.float64)

    with torch.enable_grad():
        x_full = x.clone().requires_grad_(True)
        out = _full_layer_output(layer, "model.layers.1", trainer.lora.get, x_full, cos, sin)
        params = [p for name, pair in trainer.lora.params.items() if name.startswith("model.layers.1.")
                  for p in pair]
        expected = torch.autograd.grad(out, [x_full] + params, grad_out)

    # Our path needs each token's K/V (after rope), as the forward left them in the cache.
    attn = layer.self_attn
    with torch.no_grad():
        h = layer.input_layernorm(x)
        keys = torch.stack([attn.k_proj(h[i:i + 1])[0] for i in range(length)]).view(length, attn.num_kv_heads, -1)
        values = torch.stack([attn.v_proj(h[i:i + 1])[0] for i in range(length)]).view(length, attn.num_kv_heads, -1)
        lora_k, lora_v = trainer.lora.get("model.layers.1.self_attn.k_proj"), trainer.lora.get("model.layers.1.self_attn.v_proj")
        keys = keys + (lora_k[2] * (h @ lora_k[0].T) @ lora_k[1].T).view_as(keys)
        values = values + (lora_v[2] * (h @ lora_v[0].T) @ lora_v[1].T).view_as(values)
        from coserve.models.layers import apply_rotary
        keys = apply_rotary(keys, cos, sin)
    grad_key, grad_value = torch.zeros_like(keys), torch.zeros_like(values)
    grad_x = torch.zeros_like(x)
    for p in params:
        p.grad = None
    end = length
    while end > 0:
        start = max(0, end - window)
        gx, gk, gv = layer_backward(layer, "model.layers.1", trainer.lora.get, x[start:end], grad_out[start:end],
                                    cos[start:end], sin[start:end], keys[:start], values[:start],
                                    keys[start:end], values[start:end], grad_key[start:end], grad_value[start:end], None, need_input_grad=True)
        grad_x[start:end] = gx
        if start:
            grad_key[:start] += gk
            grad_value[:start] += gv
        end = start

    torch.testing.assert_close(grad_x, expected[0], rtol=1e-9, atol=1e-12)
    for param, ref in zip(params, expected[1:]):
        torch.testing.assert_close(param.grad, ref, rtol=1e-9, atol=1e-12)
