// Opens the dashboard of a bridge that has one user whose status carries a bidi override and
// zero-width characters; the list row, its accessible name and the detail dialog must show the
// text without them. Usage: node status_text.mjs <dashboard URL with #token=...> <jid> <expected>
import { chromium } from 'playwright-core';

const [url, jid, expected] = process.argv.slice(2);
const fail = (m) => { console.error('FAIL: ' + m); process.exit(1); };
const INVISIBLE = /[\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u2069\uFEFF]/;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  const row = page.locator(`#rows button[data-jid="${jid}"]`);
  await row.waitFor({ timeout: 20000 });
  const status = await row.locator('.status').textContent();
  if (INVISIBLE.test(status)) fail(`row status keeps invisible characters: ${JSON.stringify(status)}`);
  if (status !== expected) fail(`row status ${JSON.stringify(status)}, expected ${JSON.stringify(expected)}`);
  const label = await row.getAttribute('aria-label');
  if (INVISIBLE.test(label)) fail(`accessible name keeps invisible characters: ${JSON.stringify(label)}`);
  await row.click();
  await page.waitForSelector('dialog[open]', { timeout: 10000 });
  const detail = await page.textContent('dialog[open]');
  if (INVISIBLE.test(detail)) fail(`detail keeps invisible characters: ${JSON.stringify(detail)}`);
  if (!detail.includes(expected)) fail(`detail does not show ${JSON.stringify(expected)}`);
  console.log('ALL OK');
} finally {
  await browser.close();
}
