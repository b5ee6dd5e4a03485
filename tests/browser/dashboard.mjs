// Drives headless Chromium (Debian's, via playwright-core) against a running `presence-bridge
// demo`. Usage: node dashboard.mjs <dashboard URL with #token=...> <screenshot.png>
// Exits non-zero with "FAIL: ..." on the first broken expectation.
import { chromium } from 'playwright-core';

const [url, shot] = process.argv.slice(2);
const base = url.split('#')[0];
const fail = (m) => { console.error('FAIL: ' + m); process.exit(1); };
const step = (m) => console.log('ok - ' + m);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // The 501 of /history in memory-only mode is expected (the UI explains it); anything else
  // the console reports as an error fails the test.
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().includes('status of 501')) errors.push(m.text()); });
  const external = [];
  page.on('request', (r) => { if (!r.url().startsWith(base) && !r.url().startsWith(base.replace('http', 'ws'))) external.push(r.url()); });

  // 1. Users appear.
  await page.goto(url);
  await page.waitForSelector('#rows button[data-jid]', { timeout: 20000 });
  await page.waitForFunction(() => document.getElementById('conn-text').textContent === 'live', null, { timeout: 20000 });
  const rows = await page.locator('#rows button[data-jid]').count();
  const online = Number(await page.textContent('#c-users'));
  if (rows < 5 || online < 10) fail(`too few users shown: ${rows} rows, ${online} online`);
  if (page.url().includes('token=')) fail('the token stays in the address bar');
  if (!(await page.textContent('#xmpp-state')).includes('simulated')) fail('XMPP state from /readyz not shown');
  step(`users appear: ${online} online, ${rows} rows rendered (virtualised)`);

  // 2. A change arrives live, without a reload.
  await page.evaluate(() => { window.__noReload = true; });
  const seq0 = await page.evaluate(() => st.seq);
  await page.waitForFunction((s) => st.seq > s, seq0, { timeout: 30000 });
  if (!(await page.evaluate(() => window.__noReload === true))) fail('the page reloaded');
  const seq1 = await page.evaluate(() => st.seq);
  step(`live changes applied without reload: seq ${seq0} -> ${seq1}`);

  // 3. Search filters by JID.
  const jid = await page.getAttribute('#rows button[data-jid]', 'data-jid');
  await page.fill('#q', jid);
  await page.waitForFunction((j) => {
    const b = [...document.querySelectorAll('#rows button[data-jid]')];
    return b.length >= 1 && b.every((x) => x.dataset.jid.includes(j));
  }, jid, { timeout: 5000 });
  step(`search filters: "${jid}" -> ${await page.locator('#rows button[data-jid]').count()} row(s)`);

  // 4. A user's detail opens (by keyboard: focus + Enter), shows resources, closes on Escape.
  await page.focus(`#rows button[data-jid="${jid}"]`);
  await page.keyboard.press('Enter');
  await page.waitForSelector('dialog#detail[open]', { timeout: 5000 });
  if ((await page.textContent('#d-title')) !== jid) fail('detail shows another user');
  const resources = await page.locator('#d-body table tbody tr').count();
  if (resources < 1) fail('detail lists no resources');
  await page.waitForFunction(() => /Postgres|No history|history/.test(document.getElementById('d-extras').textContent), null, { timeout: 5000 });
  step(`detail opens with ${resources} resource(s); history: "${(await page.textContent('#d-extras')).slice(0, 80)}"`);
  await page.keyboard.press('Escape');
  await page.waitForFunction(() => !document.getElementById('detail').open, null, { timeout: 5000 });

  // 5. Filters by domain and show, then the last-seen lookup box.
  await page.fill('#q', '');
  await page.selectOption('#f-domain', 'example.org');
  await page.waitForFunction(() => [...document.querySelectorAll('#rows button[data-jid]')].every((b) => b.dataset.jid.endsWith('@example.org')), null, { timeout: 5000 });
  await page.selectOption('#f-domain', '');
  await page.fill('#lookup-input', `${jid}, nobody@example.com`);
  await page.click('#lookup-form button');
  await page.waitForFunction(() => document.getElementById('lookup-out').textContent.includes('never seen'), null, { timeout: 5000 });
  step('domain filter and last-seen lookup work');

  await page.screenshot({ path: shot, fullPage: true });
  step(`screenshot saved to ${shot}`);

  // A phone-sized viewport keeps the list readable.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  if (overflow) fail('horizontal overflow on a phone-sized screen');
  await page.screenshot({ path: shot.replace(/\.png$/, '-phone.png') });
  step('phone layout has no horizontal overflow');

  if (errors.length) fail('browser errors: ' + errors.join(' | '));
  if (external.length) fail('requests to other origins: ' + external.join(', '));

  // 6. A bad token shows the error state.
  const bad = await browser.newPage();
  await bad.goto(base + '#token=not-a-valid-token');
  await bad.waitForSelector('#login:not([hidden])', { timeout: 10000 });
  const msg = await bad.textContent('#login-msg');
  if (!msg.includes('401')) fail('bad token message does not say 401: ' + msg);
  if (!(await bad.isHidden('#app'))) fail('the app is shown with a bad token');
  step(`bad token -> error state: "${msg}"`);
  console.log('ALL OK');
} finally {
  await browser.close();
}
