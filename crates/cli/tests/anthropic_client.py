"""The `anthropic` Python package, unchanged, against `genius serve`'s
Messages API (its base URL pointed at the server).

Run by tests/anthropic_client.rs with the server's address, its key and the
chat model's name:

    python3 anthropic_client.py http://127.0.0.1:PORT KEY MODEL

The expected texts are the firm greedy answers tests/openai_sdk.py checks
with log-probabilities (the same prompts and model).
"""

import sys

import anthropic

base_url, key, model = sys.argv[1:4]
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=300)
passed = []
# This client version no longer takes `temperature`; the server does.
GREEDY = {"temperature": 0}
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def check(name):
    def wrap(test):
        test()
        passed.append(name)
        print(f"ok   {name}", flush=True)
        return test

    return wrap


@check("a message")
def _():
    reply = client.messages.create(model=model, max_tokens=24, extra_body=GREEDY, messages=JAPAN)
    assert reply.type == "message" and reply.role == "assistant", reply
    text = "".join(block.text for block in reply.content if block.type == "text")
    assert "Tokyo" in text, reply.content
    assert reply.stop_reason in ("end_turn", "max_tokens"), reply.stop_reason
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > 0, reply.usage
    assert reply.usage.output_tokens > 0, reply.usage


@check("a streamed message")
def _():
    with client.messages.stream(
        model=model, max_tokens=24, extra_body=GREEDY, messages=JAPAN
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "Tokyo" in "".join(pieces), pieces
    assert len(pieces) >= 2, pieces
    assert final.content[0].text == "".join(pieces), final.content
    assert final.stop_reason in ("end_turn", "max_tokens"), final.stop_reason


@check("a tool-use round trip")
def _():
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model=model, max_tokens=64, extra_body=GREEDY, tools=[WEATHER], messages=ask)
    assert first.stop_reason == "tool_use", first
    uses = [block for block in first.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather", first.content
    assert uses[0].input.get("city") == "Paris", uses[0].input
    ask.append({"role": "assistant", "content": first.content})
    ask.append({
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees and sunny"}],
    })
    second = client.messages.create(model=model, max_tokens=64, extra_body=GREEDY, tools=[WEATHER], messages=ask)
    assert second.stop_reason != "tool_use", second
    assert any(block.type == "text" and block.text for block in second.content), second.content


@check("a forced tool call, streamed")
def _():
    with client.messages.stream(
        model=model, max_tokens=64, extra_body=GREEDY, tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Paris, please."}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use", final
    assert final.content[-1].type == "tool_use" and "city" in final.content[-1].input, final.content


@check("count_tokens, and the system prompt counts")
def _():
    counted = client.messages.count_tokens(model=model, messages=JAPAN)
    short = client.messages.count_tokens(model=model, system="Be brief.", messages=JAPAN)
    longer = client.messages.count_tokens(
        model=model, system="Be brief. Answer in one word, always, whatever the question.", messages=JAPAN)
    assert longer.input_tokens > short.input_tokens + 8, (short, longer)
    reply = client.messages.create(model=model, max_tokens=4, extra_body=GREEDY, messages=JAPAN)
    usage = reply.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0), (counted, usage)


@check("errors in Anthropic's shape")
def _():
    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=JAPAN)
    except anthropic.NotFoundError as err:
        assert err.body["error"]["type"] == "not_found_error", err.body
    else:
        raise AssertionError("no error")
    try:
        anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0).messages.create(
            model=model, max_tokens=8, messages=JAPAN)
    except anthropic.AuthenticationError as err:
        assert err.body["error"]["type"] == "authentication_error", err.body
    else:
        raise AssertionError("no error")


print(f"anthropic {anthropic.__version__}: {len(passed)} checks passed", flush=True)
