// Opens the chat page on a Pinky server (which repeats the message it is
// sent) and sends Markdown, a thought and an HTML injection: prints one
// JSON line with how the page rendered the answer.
'use strict';
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const [server, shot] = process.argv.slice(2);
const message = '<think>plan it</think>Here is **bold** and `a<b`:\n\n```js\nlet x = 1;\n```\n\n' +
  '<img src=x onerror="window.pwned=1"> [home](https://example.org/)';

(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
  let result;
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
    const elsewhere = [];
    page.on('request', (r) => { if (!r.url().startsWith(server)) elsewhere.push(r.url()); });
    await page.goto(`${server}/`);
    await page.waitForFunction(() => document.querySelectorAll('#model option').length > 0);
    await page.fill('#input', message);
    await page.press('#input', 'Enter');
    await page.waitForFunction(() => document.querySelector('.msg.assistant .meta'), null, { timeout: 30000 });
    result = await page.evaluate(() => {
      const answer = document.querySelector('.msg.assistant');
      const thinking = answer.querySelector('details.thinking');
      return {
        ok: true,
        code: answer.querySelector('pre code')?.textContent,
        codeClass: answer.querySelector('pre code')?.className,
        bold: answer.querySelector('strong')?.textContent,
        inlineCode: answer.querySelector('p code')?.textContent,
        thinking: thinking?.querySelector('div')?.textContent,
        thinkingOpen: thinking?.open,
        images: answer.querySelectorAll('img').length,
        pwned: window.pwned === 1,
        link: answer.querySelector('a')?.getAttribute('href'),
        linkRel: answer.querySelector('a')?.getAttribute('rel'),
        user: document.querySelector('.msg.user').textContent,
      };
    });
    result.elsewhere = elsewhere;
    await page.screenshot({ path: shot, fullPage: true });
  } catch (e) {
    result = { ok: false, error: String(e) };
  }
  await browser.close();
  console.log(JSON.stringify(result));
})();
