"""The official `openai` Python client against `genius serve`.

Run by tests/openai_sdk.rs with the server's base URL, its API key and the
served model id:

    python3 openai_sdk.py http://127.0.0.1:PORT/v1 KEY MODEL
    python3 openai_sdk.py http://127.0.0.1:PORT/v1 KEY MODEL --embeddings REFERENCE.json

The second form checks /v1/embeddings on an embedding model against the
vectors of an independent implementation (fixtures/embeddings).

Every expected text rests on a firm greedy choice: each answer is checked
with the server's own log-probabilities (the chosen token must beat the
runner-up by MIN_MARGIN logits, as fixtures/README.md asks).
"""

import json
import sys
import time

import jsonschema
import openai

MIN_MARGIN = 1.0

base_url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
passed = []


def check(name):
    def wrap(test):
        test()
        passed.append(name)
        print(f"ok   {name}", flush=True)
        return test

    return wrap


if sys.argv[4:5] == ["--embeddings"]:
    reference = json.load(open(sys.argv[5]))["embeddings"]

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)

    @check("embeddings (base64, the SDK's default) match the reference")
    def _():
        texts = [r["text"] for r in reference[:5]]
        reply = client.embeddings.create(model=model, input=texts)
        assert [d.index for d in reply.data] == list(range(5))
        for data, ref in zip(reply.data, reference):
            assert len(data.embedding) == len(ref["vector"])
            assert cosine(data.embedding, ref["vector"]) >= 0.999, ref["text"]
        assert reply.usage.prompt_tokens == sum(r["tokens"] for r in reference[:5])

    @check("embeddings as floats")
    def _():
        reply = client.embeddings.create(model=model, input=reference[0]["text"], encoding_format="float")
        assert cosine(reply.data[0].embedding, reference[0]["vector"]) >= 0.999

    @check("an empty text: BadRequestError")
    def _():
        try:
            client.embeddings.create(model=model, input=["fine", ""])
        except openai.BadRequestError as err:
            assert err.status_code == 400, err
        else:
            raise AssertionError("no error")

    @check("chat on an embedding model: BadRequestError")
    def _():
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        except openai.BadRequestError as err:
            assert "embedding model" in str(err), err
        else:
            raise AssertionError("no error")

    print(f"openai {openai.__version__}: {len(passed)} checks passed", flush=True)
    sys.exit(0)

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
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "job": {"type": "string", "enum": ["baker", "pilot", "teacher", "painter"]},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "job", "hobbies"],
}

def firm_until(logprobs, text):
    """The tokens up to the end of `text` in the answer each won by MIN_MARGIN."""
    seen = ""
    smallest = float("inf")
    for token in logprobs:
        tops = token.top_logprobs
        assert tops and tops[0].token == token.token, (token.token, tops)
        if len(tops) > 1:
            margin = tops[0].logprob - tops[1].logprob
            smallest = min(smallest, margin)
            assert margin >= MIN_MARGIN, f"{token.token!r} won by only {margin:.3f}"
        seen += token.token
        if text in seen:
            print(f"margin: smallest {smallest:.2f} for {text!r}")
            return
    raise AssertionError(f"{text!r} not in {seen!r}")


@check("chat, whole answer")
def _():
    reply = client.chat.completions.create(
        model=model, messages=JAPAN, temperature=0, max_tokens=24, logprobs=True, top_logprobs=2
    )
    choice = reply.choices[0]
    assert "Tokyo" in choice.message.content, choice.message.content
    firm_until(choice.logprobs.content, "Tokyo")
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.model == model


@check("chat, streamed token by token")
def _():
    stream = client.chat.completions.create(
        model=model, messages=JAPAN, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, arrivals, usage, finish = [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                arrivals.append(time.monotonic())
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    assert "Tokyo" in text, text
    assert len(pieces) >= 3, pieces
    # The pieces came one by one, not in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.01 * (len(arrivals) - 1), arrivals
    assert usage and usage.completion_tokens >= len(pieces) - 1, usage
    assert finish in ("stop", "length"), finish


@check("n=2 choices, whole and streamed")
def _():
    reply = client.chat.completions.create(
        model=model, messages=JAPAN, temperature=0.9, seed=3, max_tokens=16, n=2
    )
    assert [c.index for c in reply.choices] == [0, 1], reply.choices
    assert all(c.message.content for c in reply.choices), reply.choices
    stream = client.chat.completions.create(
        model=model, messages=JAPAN, temperature=0.9, seed=3, max_tokens=16, n=2, stream=True
    )
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    # The same seeds, so the same answers as the whole request.
    assert [texts[0], texts[1]] == [c.message.content for c in reply.choices], (texts, reply.choices)
    assert sorted(finishes) == [0, 1], finishes


@check("tool call, whole answer")
def _():
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(
            model=model, messages=PARIS, temperature=0, max_tokens=64,
            tools=[WEATHER], tool_choice=choice,
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls", reply
        assert len(message.tool_calls) == 1, message
        call = message.tool_calls[0]
        assert call.type == "function" and call.id
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}, call.function.arguments
        assert not message.content, message.content


@check("tool call, streamed")
def _():
    stream = client.chat.completions.create(
        model=model, messages=PARIS, temperature=0, max_tokens=64,
        tools=[WEATHER], tool_choice="required", stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls", finish
    assert list(calls) == [0], calls
    assert calls[0]["name"] == "get_weather" and calls[0]["id"], calls
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}, calls


@check("tool result answered")
def _():
    messages = PARIS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=48, tools=[WEATHER],
    )
    assert reply.choices[0].message.content, reply


@check("JSON-schema answer validates")
def _():
    for who in ("a baker from Lyon", "a retired pilot who loves chess", "a young teacher in Osaka"):
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=128,
            messages=[{"role": "user", "content": f"Describe {who} as a JSON object with the fields name, age, job and hobbies."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


CODE = """def area(width, height):
    return width * height


def perimeter(width, height):
    return 2 * (width + height)


def describe(width, height):
    print("area", area(width, height))
    print("perimeter", perimeter(width, height))
"""
EDIT = [{"role": "user", "content": "Rename the function `area` to `surface` everywhere. Answer with the whole code and nothing else.\n\n```python\n" + CODE + "```"}]


@check("predicted outputs: the same answer, with the prediction tokens counted")
def _():
    plain = client.chat.completions.create(
        model=model, messages=EDIT, temperature=0, max_tokens=160, logprobs=True, top_logprobs=2
    )
    text = plain.choices[0].message.content
    firm_until(plain.choices[0].logprobs.content, "def describe(width, height):")
    predicted = client.chat.completions.create(
        model=model, messages=EDIT, temperature=0, max_tokens=160,
        prediction={"type": "content", "content": "```python\n" + CODE + "```"},
    )
    cut = text.index("def describe(width, height):")
    assert predicted.choices[0].message.content[:cut] == text[:cut], (predicted, text)
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 10, predicted.usage
    assert details.rejected_prediction_tokens >= 0, predicted.usage


@check("a prediction over the limit: BadRequestError naming the limit")
def _():
    try:
        client.chat.completions.create(
            model=model, messages=EDIT, max_tokens=8,
            prediction={"type": "content", "content": "x" * (1024 * 1024 + 1)},
        )
    except openai.BadRequestError as err:
        assert err.status_code == 400 and "prediction" in str(err) and "1048576" in str(err), err
    else:
        raise AssertionError("no error")


@check("completions")
def _():
    reply = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert reply.choices[0].text, reply
    assert reply.choices[0].finish_reason == "length"


@check("completions with a suffix: the middle, in the model's fill-in-the-middle layout")
def _():
    reply = client.completions.create(
        model=model,
        prompt="def maximum(a, b):\n    if a > b:\n        return a\n    ",
        suffix="\n\n\nprint(maximum(1, 2))\n",
        max_tokens=24,
        temperature=0,
    )
    text = reply.choices[0].text
    assert "return b" in text and "<|" not in text, text


@check("models.list()")
def _():
    ids = [m.id for m in client.models.list()]
    assert ids == [model], ids
    assert client.models.retrieve(model).id == model


@check("unknown model: NotFoundError")
def _():
    try:
        client.chat.completions.create(model="no-such-model", messages=JAPAN)
    except openai.NotFoundError as err:
        assert err.status_code == 404 and err.code == "model_not_found", err
    else:
        raise AssertionError("no error")


@check("bad API key: AuthenticationError")
def _():
    wrong = openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
    try:
        wrong.chat.completions.create(model=model, messages=JAPAN)
    except openai.AuthenticationError as err:
        assert err.status_code == 401, err
    else:
        raise AssertionError("no error")
    try:
        wrong.models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("no error")


@check("bad request: BadRequestError, and the server goes on")
def _():
    try:
        client.chat.completions.create(model=model, messages=JAPAN, temperature=-1)
    except openai.BadRequestError as err:
        assert err.status_code == 400 and "temperature" in str(err), err
    else:
        raise AssertionError("no error")
    reply = client.chat.completions.create(model=model, messages=JAPAN, temperature=0, max_tokens=8)
    assert "Tokyo" in reply.choices[0].message.content


@check("agent loop, tool_choice auto: call, result, final answer")
def _():
    messages = list(PARIS)
    for step in range(4):
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=64, tools=[WEATHER],
        )
        choice = reply.choices[0]
        if choice.finish_reason != "tool_calls":
            break
        assert step == 0, f"called again after the result: {choice.message}"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather", call
        assert json.loads(call.function.arguments) == {"city": "Paris"}, call.function.arguments
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"})
    assert step == 1, "the first answer was no call"
    assert choice.message.content, choice


RESPONSES_WEATHER = {
    "type": "function", "name": "get_weather", "description": "The current weather in a city",
    "parameters": WEATHER["function"]["parameters"],
}


@check("responses: plain, streamed")
def _():
    reply = client.responses.create(model=model, input=JAPAN[0]["content"], temperature=0, max_output_tokens=24)
    assert reply.status in ("completed", "incomplete"), reply.status
    assert "Tokyo" in reply.output_text, reply.output_text
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0, reply.usage
    text, kinds = "", []
    with client.responses.stream(model=model, input=JAPAN[0]["content"], temperature=0, max_output_tokens=24) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert text == final.output_text == reply.output_text, (text, final.output_text)
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert kinds.count("response.output_text.delta") >= 3, kinds


@check("responses: function call, its output sent back")
def _():
    first = client.responses.create(
        model=model, input=PARIS[0]["content"], tools=[RESPONSES_WEATHER], temperature=0, max_output_tokens=64,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", first.output
    assert json.loads(calls[0].arguments) == {"city": "Paris"}, calls[0].arguments
    items = [{"role": "user", "content": PARIS[0]["content"]}] + [item.model_dump() for item in first.output] + [
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C and sunny"}]
    second = client.responses.create(
        model=model, input=items, tools=[RESPONSES_WEATHER], temperature=0, max_output_tokens=64,
    )
    assert second.output_text, second.output
    assert not [item for item in second.output if item.type == "function_call"], second.output


@check("responses: JSON schema")
def _():
    reply = client.responses.create(
        model=model, temperature=0, max_output_tokens=128,
        input="Describe a baker from Lyon as a JSON object with the fields name, age, job and hobbies.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
    )
    jsonschema.validate(json.loads(reply.output_text), PERSON)


@check("responses: previous_response_id, retrieve, delete")
def _():
    first = client.responses.create(model=model, input="My name is Zorblax. Remember it.", temperature=0, max_output_tokens=24)
    second = client.responses.create(
        model=model, input="What is my name?", previous_response_id=first.id, temperature=0, max_output_tokens=24,
    )
    assert second.usage.input_tokens > first.usage.input_tokens, (first.usage, second.usage)
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)
    for gone in (lambda: client.responses.retrieve(second.id),
                 lambda: client.responses.create(model=model, input="x", previous_response_id=second.id)):
        try:
            gone()
        except openai.NotFoundError as err:
            assert err.status_code == 404, err
        else:
            raise AssertionError("no error")


print(f"openai {openai.__version__}: {len(passed)} checks passed", flush=True)
