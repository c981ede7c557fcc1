// Loads the page in headless Chromium at two widths and reports anything a
// visitor would hit: console errors, failed requests, broken links.
'use strict';
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const [url, shots] = process.argv.slice(2);
const viewports = [
  { name: 'desktop', width: 1280, height: 900 },
  { name: 'phone', width: 390, height: 844, isMobile: true, deviceScaleFactor: 2 },
];

(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const problems = [];
  const origin = new URL(url).origin;
  for (const vp of viewports) {
    const context = await browser.newContext({
      viewport: { width: vp.width, height: vp.height },
      isMobile: !!vp.isMobile,
      deviceScaleFactor: vp.deviceScaleFactor || 1,
    });
    const page = await context.newPage();
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`${vp.name}: console error: ${m.text()}`); });
    page.on('pageerror', (e) => problems.push(`${vp.name}: page error: ${e.message}`));
    page.on('requestfailed', (r) => problems.push(`${vp.name}: request failed: ${r.url()} (${r.failure().errorText})`));
    page.on('response', (r) => { if (r.status() >= 400) problems.push(`${vp.name}: HTTP ${r.status()} for ${r.url()}`); });
    page.on('request', (r) => {
      if (!r.url().startsWith(origin) && !r.url().startsWith('data:')) problems.push(`${vp.name}: request to another host: ${r.url()}`);
    });
    await page.goto(url, { waitUntil: 'networkidle' });

    // The page must not scroll sideways.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 1) problems.push(`${vp.name}: page is ${overflow}px wider than the viewport`);

    await page.screenshot({ path: `${shots}/${vp.name}.png`, fullPage: false });
    await page.screenshot({ path: `${shots}/${vp.name}-full.png`, fullPage: true });
    await page.locator('#architecture figure').screenshot({ path: `${shots}/${vp.name}-architecture.png` });
    await context.close();
  }

  // Links: in-page anchors must exist; local files must be served.
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(url);
  const links = await page.$$eval('a[href]', (as) => as.map((a) => ({ raw: a.getAttribute('href'), href: a.href })));
  let checked = 0;
  for (const { raw, href } of links) {
    if (raw.startsWith('#')) {
      const found = await page.$(`[id="${raw.slice(1)}"]`);
      if (!found) problems.push(`broken in-page link ${raw}`);
      checked++;
    } else if (href.startsWith(origin)) {
      const response = await context.request.get(href);
      if (!response.ok()) problems.push(`broken local link ${raw} (HTTP ${response.status()})`);
      checked++;
    }
  }
  await browser.close();
  if (problems.length) {
    console.error(problems.join('\n'));
    console.error(`site check: ${problems.length} problem(s)`);
    process.exit(1);
  }
  console.log(`site check: no console errors, no failed requests, ${checked} local links fine; screenshots in ${shots}/`);
})().catch((e) => { console.error(e); process.exit(1); });
