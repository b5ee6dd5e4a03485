// Opens the dashboard of a follower replica (contract §11): it must say which replica it is on
// and whose follower, and show a user the leader sequenced, live.
// Usage: node replica.mjs <dashboard URL with #token=...> <expected replica text> <jid> <status>
import { chromium } from 'playwright-core';

const [url, expected, jid, status] = process.argv.slice(2);
const fail = (m) => { console.error('FAIL: ' + m); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  await page.waitForFunction((t) => document.getElementById('xmpp-state').textContent.includes(t), expected, { timeout: 20000 })
    .catch(async () => fail(`header says ${JSON.stringify(await page.textContent('#xmpp-state'))}, expected it to include ${JSON.stringify(expected)}`));
  const row = page.locator(`#rows button[data-jid="${jid}"]`);
  await row.waitFor({ timeout: 20000 });
  await page.waitForFunction(([j, s]) => {
    const r = document.querySelector(`#rows button[data-jid="${j}"] .status`);
    return r && r.textContent === s;
  }, [jid, status], { timeout: 20000 }).catch(() => fail(`the row of ${jid} never showed ${status}`));
  await page.screenshot({ path: process.env.SHOT || '/tmp/replica.png' });
  console.log('ALL OK');
} finally {
  await browser.close();
}
