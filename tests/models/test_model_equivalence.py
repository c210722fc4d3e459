"""Our Llama-family forward equals Hugging Face transformers' (fp32, 1e-4; 4e-4 for 30 real layers).

Covers one-shot prefill, chunked prefill over cached context, single-token
decodes, and a flat batch mixing all three, on tiny Llama / Mistral / Qwen2,
Llama with llama3 rope scaling and tied embeddings, Mistral with a sliding
window, and the real SmolLM2-135M-Instruct weights.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from coserve.models import make_model_dir, resolve_checkpoint, tiny_config
from coserve.models.loader import load_model
from tests.helpers import PagedRunner

ATOL = 1e-4


def _load_pair(model_dir, device=torch.device("cpu")):
    ours = load_model(resolve_checkpoint(model_dir), torch.float32, device)
    theirs = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return ours, theirs


@torch.inference_mode()
def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def _check_all_paths(ours, theirs, vocab, lengths=(23, 9, 14), seed=0, contiguous=False, atol=ATOL):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (n + 4,), generator=gen).tolist() for n in lengths]
    expected = [_hf_logits(theirs, s) for s in seqs]
    runner = PagedRunner(ours, num_seqs=len(seqs), max_len=max(len(s) for s in seqs), contiguous=contiguous)
    # Iteration 1: seq 0 whole prompt, seq 1 first chunk, seq 2 first chunk.
    split = {0: lengths[0], 1: 5, 2: 7}
    got = runner.step({i: seqs[i][:split[i]] for i in range(3)})
    for i in range(3):
        torch.testing.assert_close(got[i].cpu(), expected[i][:split[i]], atol=atol, rtol=0)
    # Iteration 2: seq 0 decodes, seq 1 and 2 continue over their cached context.
    chunk = {0: seqs[0][split[0]:split[0] + 1], 1: seqs[1][5:lengths[1]], 2: seqs[2][7:lengths[2]]}
    got = runner.step(chunk)
    torch.testing.assert_close(got[0].cpu(), expected[0][split[0]:split[0] + 1], atol=atol, rtol=0)
    torch.testing.assert_close(got[1].cpu(), expected[1][5:lengths[1]], atol=atol, rtol=0)
    torch.testing.assert_close(got[2].cpu(), expected[2][7:lengths[2]], atol=atol, rtol=0)
    # Iterations 3+: all decode together.
    pos = [split[0] + 1, lengths[1], lengths[2]]
    for _ in range(3):
        got = runner.step({i: [seqs[i][pos[i]]] for i in range(3)})
        for i in range(3):
            torch.testing.assert_close(got[i].cpu(), expected[i][pos[i]:pos[i] + 1], atol=atol, rtol=0)
            pos[i] += 1


@pytest.mark.parametrize("contiguous", [False, True], ids=["gathered-blocks", "contiguous-blocks"])
def test_tiny_architectures_match_transformers(tiny_model_dir, device, contiguous):
    ours, theirs = _load_pair(tiny_model_dir, device)
    _check_all_paths(ours, theirs, ours.config.vocab_size, contiguous=contiguous)


def test_llama3_rope_and_tied_embeddings_match_transformers(tiny_llama3_tied_dir, device):
    ours, theirs = _load_pair(tiny_llama3_tied_dir, device)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    # Long enough to pass original_max_position_embeddings, where llama3 scaling matters.
    _check_all_paths(ours, theirs, ours.config.vocab_size, lengths=(80, 40, 70))


def test_mistral_sliding_window_matches_transformers(tmp_path, device):
    model_dir = make_model_dir(tmp_path / "mistral-sw", tiny_config("mistral", sliding_window=8), seed=1)
    ours, theirs = _load_pair(model_dir, device)
    assert ours.sliding_window == 8
    _check_all_paths(ours, theirs, ours.config.vocab_size, lengths=(20, 12, 17))


def test_smollm2_real_weights_match_transformers(smollm2_checkpoint):
    ours, theirs = _load_pair(smollm2_checkpoint.model_dir)
    # NOTE: 30 layers of fp32 GEMMs: transformers' own fp32 logits are 5e-5 from an fp64 forward, ours
    # (packed oneDNN GEMMs, another summation order) 9e-5, and the two up to 2e-4 apart, on logits of
    # magnitude 34 (6e-6 of it).
    _check_all_paths(ours, theirs, ours.config.vocab_size, lengths=(12, 6, 9), atol=4e-4)


def test_sharded_checkpoint_loads_same_weights(tiny_llama_dir, tiny_llama_sharded_dir):
    a = load_model(resolve_checkpoint(tiny_llama_dir), torch.float32, torch.device("cpu"))
    b = load_model(resolve_checkpoint(tiny_llama_sharded_dir), torch.float32, torch.device("cpu"))
    assert len(resolve_checkpoint(tiny_llama_sharded_dir).weight_files) > 1
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=name)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported: Llama, Mistral, Qwen2"):
        load_model(resolve_checkpoint(tmp_path), torch.float32, torch.device("cpu"))
