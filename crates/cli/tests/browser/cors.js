// Serves a page on its own origin and has headless Chromium run it: the
// page streams a chat answer from `genius serve` (another origin) with
// fetch, as a browser chat UI would. Prints one JSON line: what the page
// read, or the error fetch gave it.
'use strict';
const http = require('http');
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const [pagePort, api, key] = process.argv.slice(2);

const page = `<!doctype html><meta charset="utf-8"><title>cors check</title>
<script>
async function ask() {
  const response = await fetch(${JSON.stringify(api)} + '/v1/chat/completions', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'Authorization': 'Bearer ${key}' },
    body: JSON.stringify({ model: 'pinky', stream: true,
      messages: [{ role: 'user', content: 'hello from a page' }] }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = '', events = 0, raw = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    raw += decoder.decode(value, { stream: true });
  }
  for (const line of raw.split('\\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    events += 1;
    const delta = JSON.parse(line.slice(6)).choices[0]?.delta?.content;
    if (delta) text += delta;
  }
  return { status: response.status, events, text };
}
</script>`;

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/html' });
  res.end(page);
});

server.listen(Number(pagePort), '127.0.0.1', async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  let result;
  try {
    const tab = await browser.newPage();
    await tab.goto(`http://127.0.0.1:${pagePort}/`);
    result = await tab.evaluate(() => ask().then((r) => ({ ok: true, ...r }),
      (e) => ({ ok: false, error: String(e) })));
  } catch (e) {
    result = { ok: false, error: `the check itself failed: ${e}` };
  }
  await browser.close();
  server.close();
  console.log(JSON.stringify(result));
});
