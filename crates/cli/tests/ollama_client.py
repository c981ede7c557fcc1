"""The `ollama` Python client, unchanged, against `genius serve`'s Ollama API.

Run by tests/ollama_client.rs with the server's address, the chat model's
and the embedding model's names, and the embeddings reference:

    python3 ollama_client.py http://127.0.0.1:PORT CHAT_MODEL EMBED_MODEL REFERENCE.json PULL_NAME

PULL_NAME is a model the server's (loopback) Hub has, to pull and delete.

The expected texts are the firm greedy answers tests/openai_sdk.py checks
with log-probabilities (the same prompts and model).
"""

import json
import sys

import jsonschema
import ollama

host, chat_model, embed_model, reference_path, pull_name = sys.argv[1:6]
reference = json.load(open(reference_path))["embeddings"]
client = ollama.Client(host=host, timeout=300)
passed = []
GREEDY = {"temperature": 0, "num_predict": 24}
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
    },
    "required": ["name", "age"],
}


def check(name):
    def wrap(test):
        test()
        passed.append(name)
        print(f"ok   {name}", flush=True)
        return test

    return wrap


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


@check("chat, whole, with Ollama's counts and durations")
def _():
    reply = client.chat(model=chat_model, messages=JAPAN, options=GREEDY, stream=False)
    assert "Tokyo" in reply.message.content, reply.message.content
    assert reply.message.role == "assistant"
    assert reply.done and reply.done_reason in ("stop", "length"), reply
    assert reply.prompt_eval_count > 0 and reply.eval_count > 0, reply
    assert reply.total_duration >= reply.eval_duration > 0, reply


@check("chat, streamed")
def _():
    parts = list(client.chat(model=chat_model, messages=JAPAN, options=GREEDY, stream=True))
    text = "".join(p.message.content for p in parts)
    assert "Tokyo" in text, text
    assert len(parts) >= 3, parts
    assert all(not p.done for p in parts[:-1]) and parts[-1].done, parts
    assert parts[-1].eval_count >= len(parts) - 2, parts[-1]


@check("chat with a tool, then its result")
def _():
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat(model=chat_model, messages=ask, tools=[WEATHER], options=GREEDY)
    calls = first.message.tool_calls or []
    assert len(calls) == 1, first.message
    assert calls[0].function.name == "get_weather", calls
    assert calls[0].function.arguments.get("city") == "Paris", calls
    ask.append(first.message)
    ask.append({"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"})
    second = client.chat(model=chat_model, messages=ask, tools=[WEATHER], options=GREEDY)
    assert second.message.content, second.message
    assert not second.message.tool_calls, second.message


@check("chat with a JSON-schema format")
def _():
    reply = client.chat(
        model=chat_model,
        messages=[{"role": "user", "content": "Make up a person."}],
        format=PERSON,
        options={"temperature": 0, "num_predict": 64},
    )
    jsonschema.validate(json.loads(reply.message.content), PERSON)


@check("generate, whole and streamed")
def _():
    reply = client.generate(model=chat_model, prompt="What is the capital of Japan?", options=GREEDY)
    assert "Tokyo" in reply.response, reply.response
    assert reply.done and reply.eval_count > 0
    parts = list(client.generate(model=chat_model, prompt="What is the capital of Japan?", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == reply.response


@check("generate with a suffix: the middle")
def _():
    reply = client.generate(
        model=chat_model,
        prompt="def maximum(a, b):\n    if a > b:\n        return a\n    ",
        suffix="\n\n\nprint(maximum(1, 2))\n",
        options=GREEDY,
    )
    assert "return b" in reply.response and "<|" not in reply.response, reply.response


@check("embed matches the reference, and the older embeddings too")
def _():
    texts = [r["text"] for r in reference[:3]]
    reply = client.embed(model=embed_model, input=texts)
    assert len(reply.embeddings) == 3
    for vector, ref in zip(reply.embeddings, reference):
        assert cosine(vector, ref["vector"]) >= 0.999, ref["text"]
    old = client.embeddings(model=embed_model, prompt=texts[0])
    assert cosine(old.embedding, reference[0]["vector"]) >= 0.999


@check("list, ps and show")
def _():
    names = [m.model for m in client.list().models]
    for model in (chat_model, embed_model):
        assert f"{model}:latest" in names, names
    loaded = [m.model for m in client.ps().models]
    assert f"{chat_model}:latest" in loaded, loaded
    assert "embedding" in client.show(embed_model).capabilities
    assert "completion" in client.show(f"{chat_model}:latest").capabilities
    # Ollama's library name for the same weights reaches the same file.
    assert "completion" in client.show("qwen2.5-coder:0.5b").capabilities


@check("an unknown model: ResponseError 404 in words")
def _():
    try:
        client.chat(model="no-such-model", messages=JAPAN)
    except ollama.ResponseError as err:
        assert err.status_code == 404, err
        assert "no-such-model" in err.error, err.error
    else:
        raise AssertionError("no error")


@check("pull with progress, then delete")
def _():
    statuses = list(client.pull(pull_name, stream=True))
    assert statuses[0].status == "pulling manifest", statuses
    assert statuses[-1].status == "success", statuses
    assert any(s.completed and s.completed == s.total for s in statuses), statuses
    assert client.pull(pull_name).status == "success"
    client.delete(pull_name)
    try:
        client.delete(pull_name)
    except ollama.ResponseError as err:
        assert err.status_code == 404, err
    else:
        raise AssertionError("deleted twice")


print(f"ollama client: {len(passed)} checks passed", flush=True)
