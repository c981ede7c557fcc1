// The `ollama` npm package, unchanged, against `genius serve`'s Ollama API.
//
//     OLLAMA_JS=/path/to/node_modules/ollama node ollama_client.mjs HOST CHAT EMBED [PULL_NAME]
//
// Prints one line per check and `N checks passed` at the end. The expected
// texts are the firm greedy answers tests/openai_sdk.py checks with
// log-probabilities (the same prompts and model).
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { Ollama } = require(process.env.OLLAMA_JS || 'ollama');
const [host, chatModel, embedModel, pullName] = process.argv.slice(2);
const client = new Ollama({ host });
const greedy = { temperature: 0, num_predict: 24 };
const japan = [{ role: 'user', content: 'What is the capital of Japan?' }];
const weather = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The current weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
let passed = 0;

function assert(ok, what) {
  if (!ok) throw new Error(`failed: ${what}`);
}

async function check(name, test) {
  await test();
  passed += 1;
  console.log(`ok   ${name}`);
}

await check('chat, whole', async () => {
  const reply = await client.chat({ model: chatModel, messages: japan, options: greedy });
  assert(reply.message.content.includes('Tokyo'), reply.message.content);
  assert(reply.done && reply.eval_count > 0 && reply.prompt_eval_count > 0, JSON.stringify(reply));
});

await check('chat, streamed', async () => {
  let text = '';
  let parts = 0;
  let last;
  for await (const part of await client.chat({ model: chatModel, messages: japan, options: greedy, stream: true })) {
    text += part.message.content;
    parts += 1;
    last = part;
  }
  assert(text.includes('Tokyo') && parts >= 3 && last.done, `${parts} parts: ${text}`);
});

await check('chat with a tool, then its result', async () => {
  const ask = [{ role: 'user', content: 'What is the weather in Paris?' }];
  const first = await client.chat({ model: chatModel, messages: ask, tools: [weather], options: greedy });
  const calls = first.message.tool_calls || [];
  assert(calls.length === 1 && calls[0].function.name === 'get_weather', JSON.stringify(first.message));
  assert(calls[0].function.arguments.city === 'Paris', JSON.stringify(calls));
  ask.push(first.message, { role: 'tool', content: '18 degrees and sunny', tool_name: 'get_weather' });
  const second = await client.chat({ model: chatModel, messages: ask, tools: [weather], options: greedy });
  assert(second.message.content && !(second.message.tool_calls || []).length, JSON.stringify(second.message));
});

await check('chat with a JSON-schema format', async () => {
  const schema = {
    type: 'object',
    properties: { name: { type: 'string' }, age: { type: 'integer' } },
    required: ['name', 'age'],
  };
  const reply = await client.chat({
    model: chatModel,
    messages: [{ role: 'user', content: 'Make up a person.' }],
    format: schema,
    options: { temperature: 0, num_predict: 64 },
  });
  const person = JSON.parse(reply.message.content);
  assert(typeof person.name === 'string' && Number.isInteger(person.age), reply.message.content);
});

await check('generate', async () => {
  const reply = await client.generate({ model: chatModel, prompt: 'What is the capital of Japan?', options: greedy });
  assert(reply.response.includes('Tokyo') && reply.done, reply.response);
});

await check('embed', async () => {
  const reply = await client.embed({ model: embedModel, input: ['a cat sat on the mat', 'stock markets fell'] });
  assert(reply.embeddings.length === 2 && reply.embeddings[0].length === 384, JSON.stringify(reply).slice(0, 200));
  const norm = Math.hypot(...reply.embeddings[0]);
  assert(Math.abs(norm - 1) < 1e-3, `norm ${norm}`);
});

await check('list, ps and show', async () => {
  const names = (await client.list()).models.map((m) => m.name);
  assert(names.includes(`${chatModel}:latest`) && names.includes(`${embedModel}:latest`), names);
  const loaded = (await client.ps()).models.map((m) => m.name);
  assert(loaded.includes(`${chatModel}:latest`), loaded);
  const shown = await client.show({ model: embedModel });
  assert(shown.capabilities.includes('embedding'), JSON.stringify(shown));
});

await check('an unknown model: a ResponseError with a 404', async () => {
  try {
    await client.chat({ model: 'no-such-model', messages: japan });
  } catch (err) {
    assert(err.status_code === 404 && err.error.includes('no-such-model'), `${err.status_code} ${err.error}`);
    return;
  }
  throw new Error('no error');
});

if (pullName) {
  await check('pull with progress, then delete', async () => {
    const statuses = [];
    for await (const status of await client.pull({ model: pullName, stream: true })) statuses.push(status);
    assert(statuses[0].status === 'pulling manifest', JSON.stringify(statuses));
    assert(statuses.at(-1).status === 'success', JSON.stringify(statuses));
    assert(statuses.some((s) => s.completed && s.completed === s.total), JSON.stringify(statuses));
    await client.delete({ model: pullName });
    try {
      await client.delete({ model: pullName });
    } catch (err) {
      assert(err.status_code === 404, String(err));
      return;
    }
    throw new Error('deleted twice');
  });
}

console.log(`ollama npm: ${passed} checks passed`);
