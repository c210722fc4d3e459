"""Chat messages -> prompt token ids, with the tokenizer's chat template or a documented default.

A tokenizer that ships a chat template (HF `tokenizer.chat_template`) is used
as is, exactly as `LLM.apply_chat_template` does. One without gets
`DEFAULT_CHAT_TEMPLATE`, a ChatML layout:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

and "<|im_end|>" becomes a stop string, so a reply ends where the template
would close it. Either way, ChatML/Llama-3 end-of-turn special tokens the
tokenizer knows also stop generation (their EOS is often a different token).
"""
from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_TEMPLATE_STOP = "<|im_end|>"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template rejected them)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[str], list[int]]:
    """Token ids of the conversation plus the generation prompt.

    Returns:
        (prompt token ids, extra stop strings, extra stop token ids) for the request.
    """
    template = None if has_chat_template(tokenizer) else DEFAULT_CHAT_TEMPLATE
    try:
        encoded = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                tokenize=True)
    except Exception as exc:   # jinja raises TemplateError (e.g. "roles must alternate") and others
        raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc
    token_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    stop = [DEFAULT_TEMPLATE_STOP] if template is not None else []
    return token_ids, stop, end_of_turn_ids(tokenizer)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the end-of-turn special tokens this tokenizer has."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id in special:
            ids.append(token_id)
    return ids
