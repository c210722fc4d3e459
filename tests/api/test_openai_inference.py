"""The OpenAI-compatible inference routes driven by the official `openai` client over a live server.

Expected texts come from the same engine called directly (`LLM.generate` with
the same prompt and greedy sampling), so the HTTP layer must add nothing and
lose nothing: same tokens, same text, usage counted from them.
"""
import json

import httpx
import openai
import pytest

from coserve import SamplingParams
from coserve.api.chat import DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_STOP, render_chat
from tests.api.conftest import MODEL_ID
from tests.helpers import make_peft_adapter_dir

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def engine_text(backend, prompt, max_tokens, adapter=None, **params):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return backend.llm.generate([prompt], params, adapter=adapter)[0]


def test_models_list_has_the_base_model(client, backend):
    models = client.models.list().data
    base = [m for m in models if m.id == MODEL_ID]
    assert len(base) == 1 and base[0].owned_by == "coserve"
    assert base[0].model_extra["root"] == str(backend.model_path) and base[0].model_extra["parent"] is None
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_greedy_completion_equals_llm_generate(client, backend):
    expected = engine_text(backend, PROMPT, 12)
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == MODEL_ID


def test_prompt_forms_and_n(client, backend):
    ids = backend.tokenizer(PROMPT)["input_ids"]
    as_text = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0)
    as_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    out = client.completions.create(model=MODEL_ID, prompt=[PROMPT, "hello world"], max_tokens=5, temperature=0,
                                    n=2)
    # Prompt-major order: choices 0-1 answer the first prompt, 2-3 the second.
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text == as_text.choices[0].text[:len(out.choices[0].text)]
    second = engine_text(backend, "hello world", 5)
    assert out.choices[2].text == out.choices[3].text == second.text
    assert out.usage.prompt_tokens == len(ids) + len(second.prompt_token_ids)


def test_seed_reproducible_and_n_choices_differ(client):
    kwargs = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234, n=3)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1, "each choice must draw its own tokens"
    single = client.completions.create(**{**kwargs, "n": 1})
    assert single.choices[0].text == texts[0]   # choice 0 keeps the seed as given


def test_stop_string_cuts_the_text(client, backend):
    full = engine_text(backend, PROMPT, 16, ignore_eos=True).text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0 and 1 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)   # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_chat_and_chat_stream_with_usage(client, backend):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    ids, _, stop_ids = render_chat(backend.tokenizer, messages)
    expected = backend.llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=stop_ids))[0]
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_raw_sse_ends_with_done(server, backend):
    expected = engine_text(backend, PROMPT, 8).text
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True, "n": 2}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block.strip()]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == expected
        assert mine[-1]["finish_reason"] in ("stop", "length")


def test_stream_arrives_token_by_token(server):
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert len(events) >= 10, f"{len(events)} chunks for 60 tokens"


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


def test_adapter_loaded_over_http_is_listed_and_served(make_server, backend, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    adapter_dir = make_peft_adapter_dir(tiny_llama_dir, root / "sql", seed=3, scale=0.5, r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj", "down_proj"])
    server = make_server(adapter_roots=[root])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "sql-http", "lora_path": "sql"})
    assert response.status_code == 200, response.text
    assert "added successfully" in response.text

    card = client.models.retrieve("sql-http")
    assert card.model_extra["parent"] == MODEL_ID and card.model_extra["root"] == str(root / "sql")
    assert "sql-http" in [m.id for m in client.models.list().data]

    expected = engine_text(backend, PROMPT, 10, adapter="sql-http", ignore_eos=True)
    base = engine_text(backend, PROMPT, 10, ignore_eos=True)
    assert expected.text != base.text, "the adapter should change the greedy output"
    out = client.completions.create(model="sql-http", prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected.text and out.model == "sql-http"

    response = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "sql-http"})
    assert response.status_code == 200, response.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql-http", prompt=PROMPT, max_tokens=2)
    assert adapter_dir.endswith("sql")


def test_default_chat_template_when_the_tokenizer_has_none(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    messages = [{"role": "user", "content": "hi"}]
    ids, stop, _ = render_chat(tokenizer, messages)
    expected = tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE,
                                             add_generation_prompt=True, tokenize=False)
    assert expected == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids) == expected
    assert stop == [DEFAULT_TEMPLATE_STOP]
