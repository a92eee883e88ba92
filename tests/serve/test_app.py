"""The endpoints through the `openai` client and raw HTTP: answers, streaming, provenance, errors, API key."""

import httpx
import openai
import pytest

from knnmem.chat import encode_prompt
from knnmem.cli import main
from knnmem.decoding import Sampling, generate
from knnmem.eval.explain import explain_generation

from serving import engine, running, server, store, tiny  # noqa: F401 (fixtures)

PROMPT = "import os"


def test_models_lists_the_model_alone_and_with_each_memory(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny", "tiny+docs"]
    card = client.models.retrieve("tiny+docs")
    assert card.memory == "docs" and card.memory_entries > 1000
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny+nothing")


def test_greedy_completion_is_what_knnmem_generate_prints(server, store, capsys):
    answer = server.client().completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=8, temperature=0)
    assert main(["generate", "--model", "model/tiny", "--memory", str(store), "--prompt", PROMPT,
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert answer.choices[0].text == capsys.readouterr().out.removesuffix("\n")
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8 and answer.usage.prompt_tokens == 3
    assert answer.model == "tiny+docs" and answer.object == "text_completion"


def test_memory_changes_the_answer_and_the_memory_field_picks_it(server, tiny):
    client = server.client()
    with_memory = client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=12, temperature=0)
    by_field = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"memory": "docs"})
    alone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    model, tokenizer = tiny
    expected = generate(model, tokenizer, None, tokenizer(PROMPT)["input_ids"], Sampling(max_new_tokens=12))
    assert by_field.choices[0].text == with_memory.choices[0].text != alone.choices[0].text == expected.text


def test_chat_streams_the_same_answer_in_openai_chunks(server):
    client = server.client()
    messages = [{"role": "user", "content": "def main("}]
    whole = client.chat.completions.create(model="tiny+docs", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny+docs", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and len(chunks) > 4
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "model": "tiny+docs", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2]


def test_stop_strings_end_the_answer_before_them(server):
    client = server.client()
    free = client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=20, temperature=0).choices[0]
    stop = free.text.strip()[3:6]  # a piece from inside the answer
    cut = client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == free.text[: free.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_repeats_and_seeds_differ(server):
    def sample(seed):
        return server.client().completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                                  top_p=0.9, seed=seed).choices[0].text

    assert sample(1) == sample(1)
    assert len({sample(seed) for seed in range(2, 6)}) > 1


def test_provenance_is_what_explain_prints_and_off_unless_asked(server, tiny, store):
    model, tokenizer = tiny
    client = server.client()
    answer = client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"provenance": True})
    import knnmem

    with knnmem.Memory.load(store, model=model) as memory:
        expected = explain_generation(model, tokenizer, memory, encode_prompt(tokenizer, PROMPT), max_new_tokens=6)
    assert [(p["document"], p["position"], p["text"]) for p in answer.provenance] == [
        (p.document, p.position, p.text) for p in expected.overall]
    assert answer.provenance[0]["document"].endswith(".txt") and answer.provenance[0]["weight"] > 0
    assert "provenance" not in client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=2).model_extra
    chunks = list(client.completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            extra_body={"provenance": True}))
    assert chunks[-1].provenance == answer.provenance


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny+docs"}', 400, "prompt"),
    (b'{"model": "tiny+docs", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "tiny+docs", "prompt": "x", "max_tokens": true}', 400, "max_tokens"),
    (b'{"model": "tiny+docs", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"model": "tiny+docs", "prompt": "x", "temperature": 3}', 400, "temperature"),
    (b'{"model": "tiny+docs", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"model": "tiny+docs", "prompt": "x", "n": 2}', 400, "n"),
    (b'{"model": "tiny+docs", "prompt": "x", "logprobs": 3}', 400, "logprobs"),
    (b'{"model": "tiny+docs", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "tiny+docs", "prompt": "x", "max_tokens": 65}', 400, "max_tokens"),
    (b'{"model": "tiny+docs", "prompt": "' + b"word " * 700 + b'"}', 400, "prompt"),
    (b'{"model": "tiny+nothing", "prompt": "x"}', 404, "model"),
    (b'{"model": "llama", "prompt": "x"}', 404, "model"),
    (b'{"model": "tiny", "prompt": "x", "memory": "nothing"}', 404, "memory"),
    (b'{"model": "tiny+docs", "prompt": "x", "memory": "other"}', 404, "memory"),
])
def test_bad_completion_requests_are_4xx_with_an_openai_error_body(server, body, status, param):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny+docs", "messages": []}, "messages"),
    ({"model": "tiny+docs", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "tiny+docs", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "tiny+docs", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000},
     "max_completion_tokens"),
])
def test_bad_chat_requests_name_the_field(server, body, param):
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_prompt_limit_names_the_lengths(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model="tiny+docs", prompt="word " * 700)
    assert raised.value.code == "context_length_exceeded" and "at most 600" in raised.value.message


def test_unknown_paths_methods_and_huge_bodies_are_refused_in_json(server):
    assert httpx.get(server.url + "/v2/things").json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    huge = httpx.post(server.url + "/v1/completions", content=b"x" * ((1 << 20) + 1))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert server.metric("knnmem_requests_total", endpoint="other", status="404") == 1


def test_with_an_api_key_every_endpoint_but_health_needs_it(engine):
    with running(engine, api_key="s3cret") as server:
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(server.url + path).status_code == 401
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                              headers={"Authorization": "s3cret"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        answer = server.client(api_key="s3cret").completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=2)
        assert answer.usage.completion_tokens == 2


def test_metrics_count_requests_tokens_and_search_time(server):
    server.client().completions.create(model="tiny+docs", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for series in ("knnmem_requests_total", "knnmem_time_to_first_token_seconds_bucket", "knnmem_queue_depth",
                   "knnmem_request_seconds_bucket", "knnmem_memory_search_seconds_bucket"):
        assert series in text
    assert server.metric("knnmem_completion_tokens_total") == 4
    assert server.metric("knnmem_memory_search_seconds_sum") > 0
    assert server.metric("knnmem_requests_total", endpoint="completions", status="200") == 1
