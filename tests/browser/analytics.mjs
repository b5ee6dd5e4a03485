// Drives headless Chromium against a running `presence-bridge demo --backfill-hours 2`: the
// Analytics view (concurrency chart with the peak marked, online-time leaderboard, clients,
// export) and the Replay view (the slider changes the map to the API's map at T; play applies
// events forward; export) and the Admin view (subscribers, closing one, resync, erase with a
// confirmation). Usage: node analytics.mjs <dashboard URL with #token=...> <screenshot
// folder>. Exits non-zero with "FAIL: ..." on the first broken expectation.
import { chromium } from 'playwright-core';
import { readFileSync } from 'node:fs';

const [url, dir] = process.argv.slice(2);
const base = url.split('#')[0];
const fail = (m) => { console.error('FAIL: ' + m); process.exit(1); };
const step = (m) => console.log('ok - ' + m);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 }, acceptDownloads: true });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // The demo's 501 to "resync now" is expected (the view explains it); any other console error
  // fails the test.
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().includes('status of 501')) errors.push(m.text()); });
  const external = [];
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(base) && !u.startsWith(base.replace('http', 'ws')) && !u.startsWith('blob:')) external.push(u);
  });

  await page.goto(url);
  await page.waitForFunction(() => document.getElementById('conn-text').textContent === 'live', null, { timeout: 20000 });
  // The backfill runs behind the live view: wait until it has passed 30 minutes ago.
  // (page.evaluate awaits the page's promise; a polling loop here, not waitForFunction.)
  let backfilled = false;
  for (let i = 0; i < 240 && !backfilled; i++) {
    backfilled = await page.evaluate(async () => {
      const at = new Date(Date.now() - 30 * 60000).toISOString();
      const r = await api('/api/v1/replay?at=' + encodeURIComponent(at));
      return r.users.length > 0;
    });
    if (!backfilled) await page.waitForTimeout(500);
  }
  if (!backfilled) fail('no backfilled history 30 minutes ago');
  step('backfilled history is there');

  // 1. Analytics, reached by keyboard from the Live tab.
  await page.focus('#tab-live');
  await page.keyboard.press('ArrowRight');
  if ((await page.getAttribute('#tab-analytics', 'aria-selected')) !== 'true') fail('ArrowRight did not select Analytics');
  if (!(await page.isHidden('#view-live'))) fail('the live view is still shown');
  await page.waitForSelector('#a-peak-marker', { state: 'attached', timeout: 20000 });
  await page.waitForFunction(() => document.querySelectorAll('#a-lead tbody tr').length > 0 && document.querySelectorAll('#a-clients tbody tr').length > 0, null, { timeout: 20000 });
  const peakUsers = Number(await page.getAttribute('#a-peak-marker', 'data-users'));
  const peakText = await page.textContent('#a-peak');
  if (!(peakUsers > 0) || !peakText.includes('peak ' + peakUsers + ' users')) fail(`peak not marked: ${peakUsers} / "${peakText}"`);
  // The marked peak is the API's peak of the same window.
  const apiPeak = await page.evaluate(async () => {
    const r = await api('/api/v1/analytics/concurrency?from=' + new Date(ana.from).toISOString() + '&to=' + new Date(ana.to).toISOString() + '&step=60');
    return r.peak.users;
  });
  if (apiPeak !== peakUsers) fail(`chart peak ${peakUsers} != API peak ${apiPeak}`);
  const paths = await page.locator('#a-chart path.series').count();
  if (paths !== 2) fail('chart lines missing: ' + paths);
  const lead = await page.locator('#a-lead tbody tr').count();
  const firstKey = await page.textContent('#a-lead tbody tr td:nth-child(2)');
  step(`analytics: peak ${peakUsers} users marked, ${lead} leaderboard rows (top: ${firstKey})`);

  // Grouping by domain changes the leaderboard's keys.
  await page.selectOption('#a-group', 'domain');
  await page.waitForFunction(() => document.getElementById('a-lead-key').textContent === 'domain'
    && [...document.querySelectorAll('#a-lead tbody tr td:nth-child(2)')].every((td) => !td.textContent.includes('@')), null, { timeout: 20000 });
  step('leaderboard by domain');

  // Export downloads a CSV with the header of contract §6.
  const [dl] = await Promise.all([page.waitForEvent('download', { timeout: 20000 }), page.click('#a-export')]);
  const csv = readFileSync(await dl.path(), 'utf8');
  const lines = csv.trimEnd().split('\r\n');
  if (lines[0] !== 'jid,resource,client,start,end,end_cause') fail('sessions CSV header: ' + lines[0]);
  if (lines.length < 2) fail('sessions CSV is empty');
  if (!/\.csv$/.test(dl.suggestedFilename())) fail('download name: ' + dl.suggestedFilename());
  step(`sessions export: ${dl.suggestedFilename()}, ${lines.length - 1} rows`);
  await page.screenshot({ path: dir + '/analytics.png', fullPage: true });

  // Phone size: no horizontal overflow in the analytics view.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  if (await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1)) fail('analytics overflows a phone-sized screen');
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.screenshot({ path: dir + '/analytics-phone-dark.png', fullPage: true });
  await page.emulateMedia({ colorScheme: 'light' });
  await page.setViewportSize({ width: 1280, height: 1000 });
  step('analytics readable on a phone (and dark)');

  // 2. Replay, by keyboard from the Analytics tab.
  await page.focus('#tab-analytics');
  await page.keyboard.press('ArrowRight');
  if ((await page.getAttribute('#tab-replay', 'aria-selected')) !== 'true') fail('ArrowRight did not select Replay');
  await page.waitForFunction(() => /users \(\d+ resources\) online at/.test(document.getElementById('r-count').textContent), null, { timeout: 45000 });
  const mapAt = () => page.evaluate(() => ({ at: rp.at, jids: [...rp.users.keys()].sort() }));
  const apiMap = (at) => page.evaluate(async (t) => (await api('/api/v1/replay?at=' + new Date(t).toISOString())).users.map((u) => u.jid).sort(), at);
  const m1 = await mapAt();
  const a1 = await apiMap(m1.at);
  if (JSON.stringify(m1.jids) !== JSON.stringify(a1)) fail('the replay map differs from the API at the same instant');
  // The slider, by keyboard: 45 minutes earlier.
  await page.focus('#r-slider');
  const v0 = Number(await page.inputValue('#r-slider'));
  // The map for a position the slider has already left must not pull it back: hold the
  // /replay answers 600 ms, pause long enough mid-way for a seek to start, then go on pressing
  // slowly (40 ms apart, under the 120 ms seek delay) so that slow answer arrives mid-press.
  const slow = async (route) => { await new Promise((r) => setTimeout(r, 600)); await route.continue(); };
  await page.route('**/api/v1/replay**', slow);
  for (let i = 0; i < 20; i++) await page.keyboard.press('ArrowLeft');
  await page.waitForTimeout(250);
  for (let i = 0; i < 25; i++) { await page.keyboard.press('ArrowLeft'); await page.waitForTimeout(40); }
  await page.waitForTimeout(1500);
  await page.unroute('**/api/v1/replay**', slow);
  const v1 = Number(await page.inputValue('#r-slider'));
  if (v1 !== v0 - 45) fail(`the slider moved from ${v0} to ${v1} after 45 ArrowLeft`);
  await page.waitForFunction((t) => rp.at < t - 40 * 60000 && !/Loading/.test(document.getElementById('r-count').textContent), m1.at, { timeout: 45000 })
    .catch(async () => fail('the map did not follow the slider: ' + JSON.stringify(await page.evaluate(() => ({
      at: new Date(rp.at).toISOString(), gen: rp.gen, slider: document.getElementById('r-slider').value,
      count: document.getElementById('r-count').textContent, sliderTime: new Date(sliderTime()).toISOString() })))));
  const m2 = await mapAt();
  if (JSON.stringify(m2.jids) === JSON.stringify(m1.jids)) fail('moving the slider 45 minutes did not change the map');
  const a2 = await apiMap(m2.at);
  if (JSON.stringify(m2.jids) !== JSON.stringify(a2)) fail('the map after the slider differs from the API at that instant');
  step(`slider: ${m1.jids.length} users at ${new Date(m1.at).toISOString()} -> ${m2.jids.length} at ${new Date(m2.at).toISOString()}`);

  // Play forward at 3600x: the events applied give the API's map at the instant reached.
  await page.selectOption('#r-speed', '3600');
  await page.click('#r-play');
  await page.waitForFunction((t) => rp.at > t + 10 * 60000, m2.at, { timeout: 30000 });
  await page.click('#r-play');
  await page.waitForFunction(() => !rp.timer, null, { timeout: 5000 });
  const m3 = await mapAt();
  const a3 = await apiMap(m3.at);
  if (JSON.stringify(m3.jids) !== JSON.stringify(a3)) fail(`played-forward map differs from the API at ${new Date(m3.at).toISOString()}: ${m3.jids.length} vs ${a3.length}`);
  step(`play: advanced to ${new Date(m3.at).toISOString()} with ${m3.jids.length} users, equal to the API's map`);

  const [dl2] = await Promise.all([page.waitForEvent('download', { timeout: 20000 }), page.click('#r-export')]);
  const ev = readFileSync(await dl2.path(), 'utf8').split('\r\n');
  if (ev[0] !== 'at,jid,resource,kind,show,status,priority,client') fail('events CSV header: ' + ev[0]);
  if (ev.length < 3) fail('events CSV is empty');
  step(`events export: ${dl2.suggestedFilename()}, ${ev.length - 2} rows`);
  await page.screenshot({ path: dir + '/replay.png', fullPage: true });

  // 3. Admin (the demo's token has the admin scope): subscribers, closing one, resync, erase.
  const erased = [];
  page.on('request', (r) => { if (r.method() === 'DELETE' && r.url().includes('/api/v1/users/')) erased.push(r.url()); });
  await page.focus('#tab-replay');
  await page.keyboard.press('ArrowRight');
  if ((await page.getAttribute('#tab-admin', 'aria-selected')) !== 'true') fail('ArrowRight did not select Admin');
  await page.waitForFunction(() => document.querySelectorAll('#ad-subs tbody tr').length >= 1, null, { timeout: 10000 });
  const before = await page.evaluate(async () => (await api('/api/v1/admin/subscribers')).subscribers.map((s) => s.id));
  // A second session, opened from the page, that the operator then closes.
  await page.evaluate(() => new Promise((resolve) => {
    const ws = new WebSocket(location.origin.replace('http', 'ws') + '/api/v1/ws?token=' + encodeURIComponent(st.token));
    window.__second = { ws, frames: [], code: null };
    ws.onmessage = (m) => window.__second.frames.push(m.data);
    ws.onclose = (e) => { window.__second.code = e.code; };
    ws.onopen = () => resolve();
  }));
  await page.click('#ad-refresh');
  await page.waitForFunction((n) => document.querySelectorAll('#ad-subs tbody tr').length === n + 1, before.length, { timeout: 10000 });
  const all = await page.evaluate(async () => (await api('/api/v1/admin/subscribers')).subscribers.map((s) => s.id));
  const second = all.find((id) => !before.includes(id));
  await page.click(`#ad-subs button[data-id="${second}"]`);
  await page.waitForFunction(() => window.__second.code !== null, null, { timeout: 10000 });
  const closed = await page.evaluate(() => window.__second);
  if (closed.code !== 1008 || !closed.frames.some((f) => f.includes('closed_by_admin'))) fail('closed session: ' + JSON.stringify(closed));
  await page.waitForFunction((n) => document.querySelectorAll('#ad-subs tbody tr').length === n, before.length, { timeout: 10000 });
  step(`admin: ${before.length} subscriber(s) listed; a second one closed with 1008 closed_by_admin`);
  await page.click('#ad-resync');
  await page.waitForFunction(() => document.getElementById('ad-status').textContent.includes('resync_unavailable'), null, { timeout: 10000 });
  step('admin: resync in the demo says resync_unavailable');
  // Erase with a confirmation: cancel sends nothing; the OK button waits for the JID typed again.
  const victim = await page.evaluate(() => [...st.users.keys()][0]);
  await page.fill('#ad-erase-jid', victim);
  await page.click('#ad-erase-form button[type=submit]');
  await page.waitForSelector('dialog#confirm[open]', { timeout: 5000 });
  if (!(await page.isDisabled('#cf-ok'))) fail('erase confirmable without typing the JID');
  await page.fill('#cf-input', victim + 'x');
  if (!(await page.isDisabled('#cf-ok'))) fail('erase confirmable with a different JID');
  await page.click('#cf-cancel');
  await page.waitForFunction(() => !document.getElementById('confirm').open, null, { timeout: 5000 });
  if (erased.length) fail('cancel still erased');
  await page.click('#ad-erase-form button[type=submit]');
  await page.waitForSelector('dialog#confirm[open]', { timeout: 5000 });
  await page.fill('#cf-input', victim);
  const t0 = Date.now();
  await page.click('#cf-ok');
  await page.waitForFunction((j) => document.getElementById('ad-erase-out').textContent === j + ' erased.', victim, { timeout: 10000 });
  if (erased.length !== 1) fail('erase requests: ' + erased.length);
  const left = await page.evaluate(async (j) => (await api('/api/v1/history/' + encodeURIComponent(j) + '?limit=1000')).events.map((e) => Date.parse(e.at)), victim);
  if (left.some((t) => t < t0 - 2000)) fail('history before the erasure is still there: ' + left.length + ' events');
  step(`admin: erased ${victim} after a typed confirmation (history now ${left.length} event(s), all newer)`);
  // Webhooks: create one (the secret is shown once), see its failing deliveries (nothing
  // listens on port 9), delete it after the confirmation.
  page.on('dialog', (d) => d.accept());
  await page.fill('#ad-wh-url', 'http://127.0.0.1:9/nobody');
  await page.click('#ad-wh-form button[type=submit]');
  await page.waitForSelector('#ad-wh-secret', { timeout: 10000 });
  const secret = await page.textContent('#ad-wh-secret');
  if (!secret.startsWith('whsec_')) fail('secret shown: ' + secret);
  const row = await page.waitForSelector('#ad-wh tbody tr:has-text("127.0.0.1:9")', { timeout: 10000 });
  const id = await row.$eval('button[data-log]', (b) => b.dataset.log);
  if ((await page.textContent('#ad-wh')).includes('whsec_')) fail('the list shows a secret');
  // The table is a snapshot taken at the click: click again until the first attempts show.
  let shown = '';
  for (let i = 0; i < 40 && !/retrying/.test(shown); i++) {
    await page.click(`#ad-wh button[data-log="${id}"]`);
    await page.waitForTimeout(500);
    shown = await page.evaluate(() => (document.getElementById('ad-wh-deliveries') || {}).textContent || '');
  }
  if (!/retrying/.test(shown) || !/cannot connect/.test(shown)) fail('deliveries table: ' + shown);
  await page.click(`#ad-wh button[data-del="${id}"]`);
  await page.waitForFunction((i) => !document.querySelector(`#ad-wh button[data-log="${i}"]`), id, { timeout: 10000 });
  step(`admin: webhook ${id} created (secret shown once), its failing deliveries listed, deleted`);
  await page.screenshot({ path: dir + '/admin.png', fullPage: true });

  if (errors.length) fail('browser errors: ' + errors.join(' | '));
  if (external.length) fail('requests to other origins: ' + external.join(', '));
  console.log('ALL OK');
} finally {
  await browser.close();
}
