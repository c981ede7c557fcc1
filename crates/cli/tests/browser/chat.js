// Drives the chat page of `genius serve` in headless Chromium as a person
// would: picks a model, sends a message and watches the answer stream in,
// stops a long answer, switches the model, starts a new chat. Prints one
// JSON line with what it saw; saves screenshots (desktop and phone width).
'use strict';
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const [server, shots, first, second] = process.argv.slice(2);
const origin = new URL(server).origin;

async function main() {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  const result = { elsewhere: [], chats: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
    page.on('request', (request) => {
      const url = new URL(request.url());
      if (url.origin !== origin) result.elsewhere.push(request.url());
      if (url.pathname === '/v1/chat/completions') result.chats.push(JSON.parse(request.postData()).model);
    });
    const problems = [];
    page.on('pageerror', (err) => problems.push(String(err)));
    page.on('console', (msg) => { if (msg.type() === 'error') problems.push(msg.text()); });
    await page.goto(`${server}/`);
    await page.waitForFunction(() => document.querySelectorAll('#model option').length > 0, null, { timeout: 30000 });
    result.models = await page.$$eval('#model option', (options) => options.map((o) => o.value));
    await page.selectOption('#model', first);
    // Greedy answers, set as a person would: the settings' slider.
    await page.click('#settings summary');
    await page.$eval('#temperature', (slider) => {
      slider.value = '0';
      slider.dispatchEvent(new Event('input'));
    });
    result.temperature = await page.$eval('#temperature-value', (n) => n.textContent);
    await page.click('#settings summary');

    // A message: the answer grows on screen while it streams.
    await page.fill('#input', 'What is the capital of Japan?');
    await page.press('#input', 'Enter');
    const lengths = new Set();
    for (let i = 0; i < 600; i += 1) {
      const text = await page.$eval('.msg.assistant:last-child', (n) => n.textContent).catch(() => '');
      lengths.add(text.length);
      if (await page.$eval('#stop', (b) => b.hidden)) break;
      await page.waitForTimeout(50);
    }
    result.answer = await page.$eval('.msg.assistant:last-child', (n) => n.textContent);
    result.growth = lengths.size;
    await page.screenshot({ path: `${shots}/chat-desktop.png`, fullPage: true });

    // A long answer, stopped once it flows.
    await page.fill('#input', 'Count from 1 to 300, one number per line, with no other text.');
    await page.press('#input', 'Enter');
    await page.waitForFunction(() => (document.querySelector('.msg.assistant:last-child')?.textContent || '').length > 20, null, { timeout: 60000 });
    const clicked = Date.now();
    await page.click('#stop');
    await page.waitForFunction(() => document.querySelector('#stop').hidden, null, { timeout: 10000 });
    result.stopMs = Date.now() - clicked;
    const stoppedAt = await page.$eval('.msg.assistant:last-child', (n) => n.textContent);
    await page.waitForTimeout(1000);
    result.grewAfterStop = (await page.$eval('.msg.assistant:last-child', (n) => n.textContent)) !== stoppedAt;
    result.stoppedMeta = stoppedAt.endsWith('stopped');

    // Another model, on a phone-sized screen.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.selectOption('#model', second);
    await page.fill('#input', 'Say hello.');
    await page.press('#input', 'Enter');
    await page.waitForFunction(() => !document.querySelector('#stop').hidden, null, { timeout: 10000 }).catch(() => {});
    await page.waitForFunction(() => document.querySelector('#stop').hidden, null, { timeout: 120000 });
    result.secondAnswer = await page.$eval('.msg.assistant:last-child', (n) => n.textContent);
    result.overflows = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
    await page.screenshot({ path: `${shots}/chat-phone.png`, fullPage: true });

    await page.click('#new');
    result.afterNew = await page.$$eval('#log .msg', (nodes) => nodes.length);
    result.problems = problems;
    result.ok = true;
  } catch (e) {
    result.ok = false;
    result.error = String(e);
  }
  await browser.close();
  console.log(JSON.stringify(result));
}

main();
