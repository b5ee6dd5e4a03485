// Opens the dashboard of a bridge that has raised a flapping alert: the Live view's alert
// strip shows it (and nothing else is broken). Usage: node alerts.mjs <dashboard URL with
// #token=...> <expected text> <screenshot>
import { chromium } from 'playwright-core';

const [url, expected, shot] = process.argv.slice(2);
const fail = (m) => { console.error('FAIL: ' + m); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(url);
  await page.waitForSelector('#alert-strip:not([hidden])', { timeout: 20000 });
  const text = await page.textContent('#alert-list');
  if (!text.includes(expected)) fail(`alert strip says ${JSON.stringify(text)}; expected ${JSON.stringify(expected)}`);
  if ((await page.getAttribute('#alert-strip', 'aria-live')) !== 'polite') fail('the strip is not announced');
  await page.screenshot({ path: shot });
  if (errors.length) fail('browser errors: ' + errors.join(' | '));
  console.log('ALL OK');
} finally {
  await browser.close();
}
