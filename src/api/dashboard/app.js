// presence-bridge dashboard: applies the WebSocket snapshot + diffs exactly as contract §5 says
// (replace a user's entry per change; resume with since+epoch after a drop; resync on
// "resync"), renders only the visible rows, and talks to the REST API for details.
'use strict';

const $ = (id) => document.getElementById(id);
const SHOW_ORDER = { chat: 0, available: 1, away: 2, xa: 3, dnd: 4, offline: 5 };
const SHOW_WORD = { chat: 'chat', available: 'available', away: 'away', xa: 'extended away', dnd: 'busy', offline: 'offline' };
const TOKEN_KEY = 'presence-bridge-token';
// Status text is what a user typed: shown without bidirectional overrides, embeddings and
// isolates (which can reverse what follows, e.g. "gnp.exe"), and without zero-width and other
// invisible characters. The API and the history keep the raw text.
const INVISIBLE = /[\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u2069\uFEFF]/g;
const shown = (text) => (text || '').replace(INVISIBLE, '');

const st = {
  token: null,
  users: new Map(),      // jid -> UserPresence (online only)
  epoch: null,
  seq: 0,
  ws: null,
  retry: 0,
  phase: 'starting',
  view: [],              // filtered + sorted JIDs
  dirty: true,           // the view needs recomputing
  flash: new Map(),      // jid -> time of last change (highlight)
  spark: [],
  scopes: [],
};

// ---------- token ----------
function readToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  st.token = sessionStorage.getItem(TOKEN_KEY);
  st.scopes = claims(st.token).scope ? claims(st.token).scope.split(/\s+/) : [];
}

function claims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part + '='.repeat((4 - part.length % 4) % 4)));
  } catch (_) {
    return {};
  }
}

function showLogin(message) {
  if (st.ws) { const ws = st.ws; st.ws = null; ws.close(); }
  $('app').hidden = true;
  $('forget').hidden = true;
  $('login').hidden = false;
  $('login-msg').textContent = message || '';
  $('login-msg').hidden = !message;
  setPhase('error', message ? 'not connected' : 'no token');
  $('token-input').focus();
}

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const t = $('token-input').value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $('token-input').value = '';
  start();
});

$('forget').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  st.token = null;
  showLogin('');
});

// ---------- REST ----------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const r = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: 'Bearer ' + st.token, 'Content-Type': 'application/json' },
  });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) throw new ApiError(r.status, body && body.error, (body && body.message) || r.statusText);
  return body;
}

function authMessage(e) {
  if (e.status === 401) return 'The bridge refused this token (401 unauthorized: ' + e.message + '). Paste a valid token.';
  if (e.status === 403) return 'This token is not allowed to read presence (403 forbidden: ' + e.message + ').';
  return null;
}

// ---------- connection ----------
function setPhase(phase, text) {
  st.phase = phase;
  $('conn-dot').className = 'dot ' + phase;
  const words = { live: 'live', connecting: 'connecting…', reconnecting: 'reconnecting…', resyncing: 'resyncing…', error: 'not connected', starting: 'starting…' };
  $('conn-text').textContent = text || words[phase] || phase;
}

function connect() {
  setPhase(st.epoch ? 'reconnecting' : 'connecting');
  const proto = location.protocol === 'https:' ? 'wss://' : 'ws://';
  let url = proto + location.host + '/api/v1/ws?token=' + encodeURIComponent(st.token);
  if (st.epoch) url += '&since=' + st.seq + '&epoch=' + encodeURIComponent(st.epoch);
  const ws = new WebSocket(url);
  st.ws = ws;
  ws.onopen = () => { st.retry = 0; };
  ws.onmessage = (ev) => {
    let f;
    try { f = JSON.parse(ev.data); } catch (_) { return; }
    onFrame(f);
  };
  ws.onclose = () => {
    if (st.ws !== ws) return; // replaced or logged out
    setPhase('reconnecting');
    const delay = Math.min(30000, 500 * 2 ** st.retry++) * (0.5 + Math.random() / 2);
    setTimeout(async () => {
      if (st.ws !== ws) return;
      try {
        await api('/api/v1/stats');
      } catch (e) {
        const m = authMessage(e);
        if (m) return showLogin(m);
      }
      connect();
    }, delay);
  };
}

function onFrame(f) {
  if (f.type === 'snapshot') {
    st.users.clear();
    for (const u of f.users) st.users.set(u.jid, u);
    st.epoch = f.epoch;
    st.seq = f.seq;
    setPhase('live');
  } else if (f.type === 'diff') {
    for (const c of f.changes) {
      if (c.seq <= st.seq) continue; // already applied (resume overlap)
      if (c.presence.online) st.users.set(c.jid, c.presence);
      else st.users.delete(c.jid);
      st.seq = c.seq;
      st.flash.set(c.jid, Date.now());
      if (detailJid === c.jid) renderDetail(c.presence);
    }
    if (st.phase !== 'live') setPhase('live');
  } else if (f.type === 'resync') {
    setPhase('resyncing'); // a fresh snapshot follows
  } else if (f.type === 'error') {
    console.warn('bridge:', f.error, f.message);
  }
  st.dirty = true;
  schedule();
}

// ---------- view ----------
let frame = 0;
function schedule() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
}

function relative(iso) {
  if (!iso) return '';
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  return Math.floor(s / 86400) + ' d';
}

function initials(client, resource) {
  const name = client || resource || '?';
  const words = name.replace(/[^A-Za-z0-9+ ]/g, ' ').trim().split(/\s+/);
  return (words.length > 1 ? words[0][0] + words[1][0] : name.slice(0, 2)).toUpperCase();
}

function recompute() {
  const q = $('q').value.trim().toLowerCase();
  const dom = $('f-domain').value;
  const show = $('f-show').value;
  const sort = $('sort').value;
  const out = [];
  for (const [jid, u] of st.users) {
    if (q && !jid.includes(q)) continue;
    if (dom && jid.slice(jid.indexOf('@') + 1) !== dom) continue;
    if (show && u.show !== show) continue;
    out.push(u);
  }
  const byJid = (a, b) => (a.jid < b.jid ? -1 : a.jid > b.jid ? 1 : 0);
  if (sort === 'since') out.sort((a, b) => (a.online_since || '').localeCompare(b.online_since || '') || byJid(a, b));
  else if (sort === 'show') out.sort((a, b) => SHOW_ORDER[a.show] - SHOW_ORDER[b.show] || byJid(a, b));
  else if (sort === 'change') out.sort((a, b) => (b.last_change || '').localeCompare(a.last_change || '') || byJid(a, b));
  else out.sort(byJid);
  st.view = out.map((u) => u.jid);
  st.dirty = false;
}

function counters() {
  let res = 0;
  const byShow = {};
  const byDomain = {};
  for (const [jid, u] of st.users) {
    res += u.resources.length;
    byShow[u.show] = (byShow[u.show] || 0) + 1;
    const d = jid.slice(jid.indexOf('@') + 1);
    byDomain[d] = (byDomain[d] || 0) + 1;
  }
  $('c-users').textContent = st.users.size;
  $('c-res').textContent = res;
  fillChips($('c-show'), Object.entries(byShow).sort((a, b) => SHOW_ORDER[a[0]] - SHOW_ORDER[b[0]]), true);
  fillChips($('c-domain'), Object.entries(byDomain).sort((a, b) => b[1] - a[1]), false);
  // Domain filter options follow what is online.
  for (const sel of [$('f-domain'), $('a-domain')]) {
    const have = new Set([...sel.options].map((o) => o.value));
    for (const d of Object.keys(byDomain).sort()) {
      if (!have.has(d)) { const o = document.createElement('option'); o.value = d; o.textContent = d; sel.appendChild(o); }
    }
  }
}

function fillChips(ul, entries, isShow) {
  ul.replaceChildren(...entries.map(([k, v]) => {
    const li = document.createElement('li');
    if (isShow) { li.className = 'show show-' + k; li.textContent = SHOW_WORD[k] + ' ' + v; }
    else li.textContent = k + ' ' + v;
    return li;
  }));
}

const ROW = 56;
function renderRows() {
  const vp = $('viewport');
  const n = st.view.length;
  $('spacer').style.height = n * ROW + 'px';
  $('empty').hidden = n > 0;
  $('count-visible').textContent = n === st.users.size ? n + ' shown' : n + ' of ' + st.users.size + ' shown';
  const first = Math.max(0, Math.floor(vp.scrollTop / ROW) - 5);
  const last = Math.min(n, Math.ceil((vp.scrollTop + vp.clientHeight) / ROW) + 5);
  const rows = $('rows');
  rows.style.transform = 'translateY(' + first * ROW + 'px)';
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.jid : null;
  const items = [];
  const now = Date.now();
  for (let i = first; i < last; i++) {
    const u = st.users.get(st.view[i]);
    if (!u) continue;
    const li = document.createElement('li');
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'user row';
    b.dataset.jid = u.jid;
    const since = u.online_since ? 'online for ' + relative(u.online_since) : '';
    b.setAttribute('aria-label', u.jid + ', ' + SHOW_WORD[u.show] + (u.status ? ', ' + shown(u.status) : '') + ', ' + u.resources.length + ' device(s), ' + since);
    if (now - (st.flash.get(u.jid) || 0) < 1200) b.classList.add('flash');
    const show = cell('c-show', 'show show-' + u.show, SHOW_WORD[u.show]);
    const idle = u.resources.filter((r) => r.idle_since).map((r) => r.idle_since).sort()[0];
    const jid = cell('c-jid', 'jid', u.jid);
    if (idle && u.resources.every((r) => r.idle_since)) {
      const s = document.createElement('span');
      s.className = 'idle';
      s.textContent = '· idle ' + relative(idle);
      jid.appendChild(s);
    }
    const status = cell('c-status', 'status', shown(u.status));
    const dev = cell('c-dev', 'devices', '');
    for (const r of u.resources) {
      const d = document.createElement('span');
      d.className = 'dev show-' + r.show;
      d.textContent = initials(r.client, r.resource);
      d.title = (r.client || 'unknown client') + ' — ' + r.resource + ' (' + SHOW_WORD[r.show] + ', priority ' + r.priority + ')';
      dev.appendChild(d);
    }
    const sinceCell = cell('c-since', 'muted', relative(u.online_since));
    b.append(show, jid, status, dev, sinceCell);
    li.appendChild(b);
    items.push(li);
  }
  rows.replaceChildren(...items);
  if (focused) {
    const again = rows.querySelector('[data-jid="' + CSS.escape(focused) + '"]');
    if (again) again.focus({ preventScroll: true });
  }
}

function cell(area, cls, text) {
  const s = document.createElement('span');
  s.className = 'cell ' + area + ' ' + cls;
  s.textContent = text;
  return s;
}

function render() {
  if (st.dirty) recompute();
  counters();
  renderRows();
  drawSpark();
}

for (const id of ['q', 'f-domain', 'f-show', 'sort']) {
  $(id).addEventListener('input', () => { st.dirty = true; $('viewport').scrollTop = 0; schedule(); });
}
$('viewport').addEventListener('scroll', () => schedule(), { passive: true });
$('rows').addEventListener('click', (e) => {
  const b = e.target.closest('button[data-jid]');
  if (b) openDetail(b.dataset.jid);
});
// Arrow keys move between rows.
$('rows').addEventListener('keydown', (e) => {
  if (e.key !== 'ArrowDown' && e.key !== 'ArrowUp') return;
  const b = e.target.closest('button[data-jid]');
  if (!b) return;
  e.preventDefault();
  const i = st.view.indexOf(b.dataset.jid) + (e.key === 'ArrowDown' ? 1 : -1);
  if (i < 0 || i >= st.view.length) return;
  const vp = $('viewport');
  if (i * ROW < vp.scrollTop) vp.scrollTop = i * ROW;
  if ((i + 1) * ROW > vp.scrollTop + vp.clientHeight) vp.scrollTop = (i + 1) * ROW - vp.clientHeight;
  render();
  const next = $('rows').querySelector('[data-jid="' + CSS.escape(st.view[i]) + '"]');
  if (next) next.focus();
});
setInterval(schedule, 15000); // relative times

// ---------- sparkline ----------
async function loadSpark() {
  try {
    const r = await api('/api/v1/stats/concurrency');
    st.spark = r.samples.map((s) => s.online_users);
    const mins = Math.round((r.samples.length * r.interval_secs) / 60);
    $('spark-range').textContent = r.samples.length ? '(' + (mins < 1 ? 'under a minute' : mins + ' min') + ' of samples)' : '';
    schedule();
  } catch (_) { /* the next poll retries */ }
}

function drawSpark() {
  const pts = st.spark.concat([st.users.size]);
  if (pts.length < 2) { $('spark-line').setAttribute('points', ''); return; }
  const max = Math.max(...pts, 1);
  const min = Math.min(...pts);
  const span = Math.max(1, max - min);
  const step = 300 / (pts.length - 1);
  $('spark-line').setAttribute('points', pts.map((v, i) => (i * step).toFixed(1) + ',' + (56 - ((v - min) / span) * 52).toFixed(1)).join(' '));
}

// ---------- readiness ----------
async function pollReady() {
  try {
    const r = await fetch('/readyz');
    const b = await r.json();
    const x = b.xmpp === 'simulated' ? 'XMPP: simulated (demo)'
      : b.xmpp === 'replica' ? 'XMPP: held by the leader'
      : 'XMPP: ' + b.xmpp + (b.stale ? ' (stale)' : '') + (b.resyncing ? ', resyncing' : '');
    // A replica (contract §11): which one this dashboard is on, and its role.
    const replica = b.role
      ? 'replica ' + b.node + ' (' + b.role + (b.role === 'follower' && b.leader ? ' of ' + b.leader : '') + (b.stream_lag ? ', ' + b.stream_lag + ' behind' : '') + ') · '
      : '';
    $('xmpp-state').textContent = replica + x + ' · store: ' + b.store + (b.spooled_events ? ' (' + b.spooled_events + ' spooled)' : '');
  } catch (_) {
    $('xmpp-state').textContent = 'bridge unreachable';
  }
}

// ---------- detail ----------
let detailJid = null;
function openDetail(jid) {
  detailJid = jid;
  const u = st.users.get(jid);
  $('d-title').textContent = jid;
  renderDetail(u || null);
  const dlg = $('detail');
  if (!dlg.open) dlg.showModal();
  loadDetailExtras(jid);
}

$('d-close').addEventListener('click', () => $('detail').close());
$('detail').addEventListener('close', () => { detailJid = null; });

function renderDetail(u) {
  const body = $('d-body');
  const facts = document.createElement('dl');
  facts.className = 'facts';
  const add = (k, v) => { const dt = document.createElement('dt'); dt.textContent = k; const dd = document.createElement('dd'); if (v instanceof Node) dd.appendChild(v); else dd.textContent = v; facts.append(dt, dd); };
  if (u) {
    const s = document.createElement('span');
    s.className = 'show show-' + u.show;
    s.textContent = SHOW_WORD[u.show];
    add('show', s);
    add('status', shown(u.status) || '—');
    add('priority', String(u.priority));
    add('online since', u.online_since ? new Date(u.online_since).toLocaleString() + ' (' + relative(u.online_since) + ')' : '—');
    add('last change', u.last_change ? new Date(u.last_change).toLocaleString() : '—');
    add('last seen', u.online ? 'online now' : (u.last_seen ? new Date(u.last_seen).toLocaleString() : '—'));
  } else {
    add('show', 'offline');
  }
  const table = document.createElement('table');
  table.innerHTML = '<caption class="muted">Resources</caption><thead><tr><th scope="col">resource</th><th scope="col">client</th><th scope="col">show</th><th scope="col">status</th><th scope="col">priority</th><th scope="col">since</th><th scope="col">idle</th></tr></thead>';
  const tb = document.createElement('tbody');
  for (const r of (u ? u.resources : [])) {
    const tr = document.createElement('tr');
    for (const v of [r.resource, r.client || '—', SHOW_WORD[r.show], shown(r.status) || '—', String(r.priority), relative(r.since), r.idle_since ? relative(r.idle_since) : '—']) {
      const td = document.createElement('td');
      td.textContent = v;
      tr.appendChild(td);
    }
    tb.appendChild(tr);
  }
  table.appendChild(tb);
  const extras = document.createElement('div');
  extras.id = 'd-extras';
  const old = $('d-extras');
  if (old) extras.replaceChildren(...old.childNodes);
  body.replaceChildren(facts, table, extras);
}

async function loadDetailExtras(jid) {
  const box = $('d-extras');
  const h = document.createElement('h3');
  h.textContent = 'Recent history';
  const out = document.createElement('div');
  box.replaceChildren(h, out);
  if (!st.scopes.includes('history:read') && !st.scopes.includes('admin')) {
    out.textContent = 'This token has no history:read scope.';
    return;
  }
  try {
    const r = await api('/api/v1/history/' + encodeURIComponent(jid) + '?limit=20');
    if (!r.events.length) { out.textContent = 'No history yet.'; return; }
    const ul = document.createElement('ul');
    ul.className = 'timeline';
    for (const e of r.events) {
      const li = document.createElement('li');
      li.textContent = new Date(e.at).toLocaleString() + ' — ' + e.resource + ': ' + (e.kind === 'available' ? (SHOW_WORD[e.show] || 'available') : 'went offline') + (e.status ? ' “' + shown(e.status) + '”' : '');
      ul.appendChild(li);
    }
    out.replaceChildren(ul);
  } catch (e) {
    out.textContent = e.code === 'history_disabled' ? 'History needs Postgres; this bridge keeps presence in memory only.' : (authMessage(e) || 'History unavailable: ' + e.message);
  }
}

// ---------- last-seen lookup ----------
$('lookup-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const jids = $('lookup-input').value.split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean);
  const out = $('lookup-out');
  if (!jids.length) return;
  out.textContent = 'Looking up…';
  try {
    const r = await api('/api/v1/last-seen', { method: 'POST', body: JSON.stringify({ jids }) });
    const table = document.createElement('table');
    table.innerHTML = '<thead><tr><th scope="col">JID</th><th scope="col">online</th><th scope="col">last seen</th><th scope="col">status</th></tr></thead>';
    const tb = document.createElement('tbody');
    for (const x of r.results) {
      const tr = document.createElement('tr');
      const seen = x.online ? 'online now (since ' + relative(x.online_since) + ')' : (x.last_seen ? new Date(x.last_seen).toLocaleString() + ' (' + relative(x.last_seen) + ' ago)' : '—');
      for (const v of [x.jid, x.online ? 'yes' : 'no', seen, shown(x.status) || '—']) {
        const td = document.createElement('td');
        td.textContent = v;
        tr.appendChild(td);
      }
      tb.appendChild(tr);
    }
    for (const j of r.unknown) {
      const tr = document.createElement('tr');
      const td = document.createElement('td');
      td.textContent = j;
      const td2 = document.createElement('td');
      td2.colSpan = 3;
      td2.textContent = 'never seen';
      tr.append(td, td2);
      tb.appendChild(tr);
    }
    table.appendChild(tb);
    out.replaceChildren(table);
  } catch (err) {
    out.textContent = authMessage(err) || (err.code === 'invalid_jid' ? err.message : 'Lookup failed: ' + err.message);
  }
});

// ---------- views (tabs) ----------
const TABS = ['live', 'analytics', 'replay', 'admin'];
function canReadHistory() { return st.scopes.includes('history:read') || st.scopes.includes('admin'); }

function showTab(name, focus) {
  for (const t of TABS) {
    const on = t === name;
    const b = $('tab-' + t);
    b.setAttribute('aria-selected', String(on));
    b.tabIndex = on ? 0 : -1;
    $('view-' + t).hidden = !on;
  }
  if (focus) $('tab-' + name).focus();
  if (name !== 'replay') pauseReplay();
  if (name === 'analytics' && (!ana.loadedAt || Date.now() - ana.loadedAt > 60000)) loadAnalytics();
  if (name === 'replay' && !rp.loaded) seekReplay();
  if (name === 'admin') { loadSubscribers(); loadWebhooks(); }
  if (name === 'live') schedule();
}

for (const t of TABS) $('tab-' + t).addEventListener('click', () => showTab(t, false));
document.querySelector('.tabs').addEventListener('keydown', (e) => {
  const tabs = TABS.filter((t) => !$('tab-' + t).hidden);
  const i = tabs.findIndex((t) => $('tab-' + t).getAttribute('aria-selected') === 'true');
  let j = null;
  if (e.key === 'ArrowRight') j = (i + 1) % tabs.length;
  else if (e.key === 'ArrowLeft') j = (i + tabs.length - 1) % tabs.length;
  else if (e.key === 'Home') j = 0;
  else if (e.key === 'End') j = tabs.length - 1;
  if (j === null) return;
  e.preventDefault();
  showTab(tabs[j], true);
});

function duration(secs) {
  const s = Math.round(secs);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min';
  const h = Math.floor(s / 3600);
  return h + ' h ' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + ' min';
}

function when(ms) {
  return new Date(ms).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined) q.set(k, v);
  return q.toString();
}

// Exports stream from the bridge with the token in the header, then download as a file named
// by the bridge's Content-Disposition.
async function download(path, fallback) {
  const r = await fetch(path, { headers: { Authorization: 'Bearer ' + st.token } });
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, body && body.error, (body && body.message) || r.statusText);
  }
  const blob = await r.blob();
  const m = (r.headers.get('Content-Disposition') || '').match(/filename="?([^";]+)"?/);
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = m ? m[1] : fallback;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 5000);
  return blob.size;
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement('tr');
    for (const c of cells) {
      const td = document.createElement('td');
      if (c instanceof Node) td.appendChild(c); else td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function bar(fraction, text) {
  const wrap = document.createElement('span');
  wrap.className = 'barcell';
  const b = document.createElement('span');
  b.className = 'bar';
  b.style.width = Math.max(1, Math.round(fraction * 100)) + '%';
  const t = document.createElement('span');
  t.textContent = text;
  wrap.append(b, t);
  return wrap;
}

// ---------- analytics ----------
const ana = { loadedAt: 0, gen: 0, from: 0, to: 0 };
const SVGNS = 'http://www.w3.org/2000/svg';
// Steps: at most ~1,500 points whatever the window (the API allows 10,000).
const STEP_FOR = { 3600: 10, 86400: 60, 604800: 600 };

function analyticsWindow() {
  const secs = Number($('a-window').value);
  const to = Math.floor(Date.now() / 1000) * 1000;
  return { secs, from: to - secs * 1000, to };
}

async function loadAnalytics() {
  if (!canReadHistory()) return;
  const gen = ++ana.gen;
  const w = analyticsWindow();
  ana.from = w.from; ana.to = w.to;
  const base = { from: new Date(w.from).toISOString(), to: new Date(w.to).toISOString(), domain: $('a-domain').value };
  $('a-status').textContent = 'Loading…';
  try {
    const [conc, lead, cli] = await Promise.all([
      api('/api/v1/analytics/concurrency?' + query({ ...base, step: STEP_FOR[w.secs] || 60 })),
      api('/api/v1/analytics/online-time?' + query({ ...base, group: $('a-group').value, limit: 20 })),
      api('/api/v1/analytics/clients?' + query(base)),
    ]);
    if (gen !== ana.gen) return; // a newer request won
    drawChart(conc);
    const top = lead.rows.length ? lead.rows[0].seconds : 1;
    $('a-lead-key').textContent = lead.group;
    fillRows($('a-lead').tBodies[0], lead.rows.map((r, i) => [String(i + 1), r.key, bar(r.seconds / Math.max(1, top), duration(r.seconds)), String(r.sessions)]));
    const cmax = cli.rows.reduce((m, r) => Math.max(m, r.seconds), 1);
    fillRows($('a-clients').tBodies[0], cli.rows.map((r) => [r.client, String(r.users), String(r.resources), bar(r.seconds / cmax, duration(r.seconds))]));
    ana.loadedAt = Date.now();
    $('a-status').textContent = 'Updated ' + new Date().toLocaleTimeString();
  } catch (e) {
    if (gen !== ana.gen) return;
    $('a-status').textContent = authMessage(e) || (e.code === 'history_disabled' ? 'No history is kept by this bridge.' : 'Analytics unavailable: ' + e.message);
  }
}

function drawChart(c) {
  const svg = $('a-chart');
  for (const n of [...svg.querySelectorAll('path, line')]) n.remove();
  const pts = c.points;
  const X0 = 0, X1 = 800, Y0 = 214, Y1 = 6;
  const max = Math.max(1, ...pts.map((p) => p.resources));
  const t0 = Date.parse(c.from), t1 = Date.parse(c.to);
  const x = (t) => X0 + ((t - t0) / Math.max(1, t1 - t0)) * (X1 - X0);
  const y = (v) => Y0 - (v / max) * (Y0 - Y1);
  const line = (cls, x1, y1, x2, y2) => {
    const l = document.createElementNS(SVGNS, 'line');
    l.setAttribute('class', cls);
    l.setAttribute('x1', x1); l.setAttribute('y1', y1); l.setAttribute('x2', x2); l.setAttribute('y2', y2);
    svg.appendChild(l);
    return l;
  };
  for (const f of [0.25, 0.5, 0.75, 1]) line('grid', X0, y(max * f), X1, y(max * f));
  const path = (cls, key) => {
    const p = document.createElementNS(SVGNS, 'path');
    p.setAttribute('class', cls);
    // Steps: each point holds from t to t + step.
    let d = '';
    pts.forEach((pt, i) => {
      const a = x(Date.parse(pt.t));
      const b = i + 1 < pts.length ? x(Date.parse(pts[i + 1].t)) : X1;
      d += (i ? 'L' : 'M') + a.toFixed(1) + ',' + y(pt[key]).toFixed(1) + 'L' + b.toFixed(1) + ',' + y(pt[key]).toFixed(1);
    });
    p.setAttribute('d', d);
    svg.appendChild(p);
  };
  if (pts.length) {
    path('series resources', 'resources');
    path('series users', 'users');
  }
  const peakT = Date.parse(c.peak.t);
  if (c.peak.users > 0) {
    const m = line('peak', x(peakT), Y1, x(peakT), Y0);
    m.setAttribute('id', 'a-peak-marker');
    m.dataset.users = c.peak.users;
    const title = document.createElementNS(SVGNS, 'title');
    title.textContent = 'peak: ' + c.peak.users + ' users at ' + new Date(peakT).toLocaleString();
    m.appendChild(title);
  }
  $('a-peak').textContent = c.peak.users > 0 ? '— peak ' + c.peak.users + ' users at ' + when(peakT) : '— nobody online in this window';
  $('a-axis').textContent = when(t0) + ' → ' + when(t1) + ' · scale 0–' + max + ' · ' + c.step + ' s steps';
  svg.setAttribute('aria-label', 'Online users over the window; peak ' + c.peak.users + ' users at ' + new Date(peakT).toLocaleString());
}

for (const id of ['a-window', 'a-domain', 'a-group']) $(id).addEventListener('change', loadAnalytics);
$('a-refresh').addEventListener('click', loadAnalytics);
$('a-export').addEventListener('click', async () => {
  const w = analyticsWindow();
  $('a-status').textContent = 'Exporting…';
  try {
    const bytes = await download('/api/v1/export/sessions?' + query({ from: new Date(w.from).toISOString(), to: new Date(w.to).toISOString(), domain: $('a-domain').value, format: 'csv' }), 'sessions.csv');
    $('a-status').textContent = 'Exported ' + bytes.toLocaleString() + ' bytes of sessions';
  } catch (e) {
    $('a-status').textContent = authMessage(e) || 'Export failed: ' + e.message;
  }
});

// ---------- replay ----------
// The map at T comes from /replay; playing forward applies /events in time order.
const rp = { loaded: false, gen: 0, at: 0, from: 0, to: 0, users: new Map(), queue: [], fetchedTo: 0, fetching: false, timer: 0, last: 0 };

function replayWindow() {
  const secs = Number($('r-window').value);
  const to = Date.now();
  return { from: to - secs * 1000, to };
}

function sliderTime() {
  const s = $('r-slider');
  return rp.from + (Number(s.value) / Number(s.max)) * (rp.to - rp.from);
}

function setSlider(t) {
  const s = $('r-slider');
  s.value = String(Math.round(((t - rp.from) / Math.max(1, rp.to - rp.from)) * Number(s.max)));
  s.setAttribute('aria-valuetext', new Date(t).toLocaleString());
}

function aggregate(u) {
  let best = null;
  for (const r of u.resources.values()) {
    if (!best || r.priority > best.priority || (r.priority === best.priority && SHOW_ORDER[r.show] < SHOW_ORDER[best.show])) best = r;
  }
  return best;
}

let seekTimer = 0;
function seekReplay() {
  clearTimeout(seekTimer);
  seekTimer = setTimeout(() => loadReplay(sliderTime()), 120);
}

async function loadReplay(t) {
  if (!canReadHistory()) return;
  if (!rp.loaded) { const w = replayWindow(); rp.from = w.from; rp.to = w.to; t = sliderTime(); }
  const gen = ++rp.gen;
  rp.loaded = true;
  $('r-count').textContent = 'Loading the map at ' + new Date(t).toLocaleString() + '…';
  try {
    const r = await api('/api/v1/replay?' + query({ at: new Date(t).toISOString() }));
    if (gen !== rp.gen) return;
    rp.users = new Map();
    for (const u of r.users) {
      const res = new Map();
      for (const x of u.resources) res.set(x.resource, { resource: x.resource, show: x.show, status: x.status, priority: x.priority, client: x.client });
      rp.users.set(u.jid, { jid: u.jid, resources: res, online_since: Date.parse(u.online_since), last_change: Date.parse(u.last_change) });
    }
    rp.at = Date.parse(r.at);
    rp.queue = [];
    rp.fetchedTo = rp.at;
    renderReplay();
  } catch (e) {
    if (gen !== rp.gen) return;
    $('r-count').textContent = authMessage(e) || (e.code === 'history_disabled' ? 'No history is kept by this bridge.' : 'Replay unavailable: ' + e.message);
  }
}

function applyEvent(e) {
  const at = Date.parse(e.at);
  let u = rp.users.get(e.jid);
  if (e.kind === 'available') {
    if (!u) { u = { jid: e.jid, resources: new Map(), online_since: at, last_change: at }; rp.users.set(e.jid, u); }
    u.resources.set(e.resource, { resource: e.resource, show: e.show, status: e.status, priority: e.priority || 0, client: e.client });
    u.last_change = at;
  } else if (u) {
    u.resources.delete(e.resource);
    u.last_change = at;
    if (!u.resources.size) rp.users.delete(e.jid);
  }
}

function renderReplay() {
  $('r-at').textContent = '— ' + new Date(rp.at).toLocaleString();
  setSlider(rp.at);
  const users = [...rp.users.values()].sort((a, b) => (a.jid < b.jid ? -1 : 1));
  let res = 0;
  for (const u of users) res += u.resources.size;
  $('r-count').textContent = users.length + ' users (' + res + ' resources) online at ' + new Date(rp.at).toLocaleString() + (users.length > 200 ? '; the first 200 shown' : '');
  fillRows($('r-table').tBodies[0], users.slice(0, 200).map((u) => {
    const top = aggregate(u);
    const s = document.createElement('span');
    s.className = 'show show-' + top.show;
    s.textContent = SHOW_WORD[top.show];
    const devices = [...u.resources.values()].map((r) => initials(r.client, r.resource)).join(' ');
    return [u.jid, s, shown(top.status), devices, when(u.online_since)];
  }));
}

async function fetchEvents(gen) {
  if (rp.fetching) return;
  rp.fetching = true;
  try {
    const speed = Number($('r-speed').value);
    const from = rp.fetchedTo;
    const to = Math.min(Date.now(), from + Math.max(60000, speed * 10000));
    if (to <= from) return;
    let cursor = null;
    const got = [];
    do {
      const r = await api('/api/v1/events?' + query({ from: new Date(from).toISOString(), to: new Date(to).toISOString(), limit: 10000, cursor }));
      got.push(...r.events);
      cursor = r.next_cursor;
    } while (cursor && got.length < 100000);
    if (gen !== rp.gen) return;
    rp.queue.push(...got);
    rp.fetchedTo = to;
  } catch (e) {
    $('r-count').textContent = 'Playing stopped: ' + (authMessage(e) || e.message);
    pauseReplay();
  } finally {
    rp.fetching = false;
  }
}

function tick() {
  const now = performance.now();
  const speed = Number($('r-speed').value);
  const next = Math.min(Date.now(), rp.at + (now - rp.last) * speed);
  rp.last = now;
  // Events not fetched yet: wait for them rather than skip them.
  const target = Math.min(next, rp.fetchedTo);
  let n = 0;
  while (n < rp.queue.length && Date.parse(rp.queue[n].at) <= target) applyEvent(rp.queue[n++]);
  rp.queue.splice(0, n);
  rp.at = Math.max(rp.at, target);
  if (rp.fetchedTo - rp.at < speed * 5000) fetchEvents(rp.gen);
  renderReplay();
  if (rp.at >= Date.now() - 1000) { pauseReplay(); $('r-count').textContent += ' — reached now'; }
}

function playReplay() {
  if (rp.timer) return;
  rp.last = performance.now();
  rp.timer = setInterval(tick, 250);
  $('r-play').textContent = 'Pause';
  $('r-play').setAttribute('aria-pressed', 'true');
  fetchEvents(rp.gen);
}

function pauseReplay() {
  if (!rp.timer) return;
  clearInterval(rp.timer);
  rp.timer = 0;
  $('r-play').textContent = 'Play';
  $('r-play').setAttribute('aria-pressed', 'false');
}

$('r-play').addEventListener('click', () => (rp.timer ? pauseReplay() : playReplay()));
$('r-slider').addEventListener('input', () => {
  pauseReplay();
  // A map still loading for an earlier slider position must not snap the slider back to it.
  rp.gen++;
  $('r-at').textContent = '— ' + new Date(sliderTime()).toLocaleString();
  seekReplay();
});
$('r-window').addEventListener('change', () => {
  pauseReplay();
  rp.gen++;
  const w = replayWindow();
  rp.from = w.from; rp.to = w.to;
  seekReplay();
});
$('r-export').addEventListener('click', async () => {
  const w = replayWindow();
  const out = $('r-count');
  const before = out.textContent;
  out.textContent = 'Exporting…';
  try {
    const bytes = await download('/api/v1/export/events?' + query({ from: new Date(w.from).toISOString(), to: new Date(w.to).toISOString(), format: 'csv' }), 'events.csv');
    out.textContent = before + ' — exported ' + bytes.toLocaleString() + ' bytes of events';
  } catch (e) {
    out.textContent = authMessage(e) || 'Export failed: ' + e.message;
  }
});

// ---------- admin (scope admin) ----------
async function loadSubscribers() {
  try {
    const r = await api('/api/v1/admin/subscribers');
    $('ad-subs-count').textContent = '(' + r.subscribers.length + ' open)';
    fillRows($('ad-subs').tBodies[0], r.subscribers.map((s) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'ghost small';
      b.textContent = 'Close';
      b.dataset.id = s.id;
      b.setAttribute('aria-label', 'Close the session of ' + s.sub + ' from ' + (s.remote_addr || 'unknown'));
      const f = s.filter.jids || s.filter.domains ? [...(s.filter.jids || []), ...(s.filter.domains || [])].join(', ') : 'everything';
      return [s.sub, s.remote_addr || '—', relative(s.connected_at) + ' ago', f, String(s.frames_sent), String(s.resyncs), b];
    }));
  } catch (e) {
    $('ad-status').textContent = authMessage(e) || 'Subscribers unavailable: ' + e.message;
  }
}

$('ad-refresh').addEventListener('click', loadSubscribers);
$('ad-subs').addEventListener('click', async (e) => {
  const b = e.target.closest('button[data-id]');
  if (!b) return;
  try {
    await api('/api/v1/admin/subscribers/' + encodeURIComponent(b.dataset.id), { method: 'DELETE' });
    $('ad-status').textContent = 'Session closed.';
  } catch (err) {
    $('ad-status').textContent = authMessage(err) || 'Could not close it: ' + err.message;
  }
  setTimeout(loadSubscribers, 300);
});
$('ad-resync').addEventListener('click', async () => {
  try {
    await api('/api/v1/admin/resync', { method: 'POST' });
    $('ad-status').textContent = 'Resync started: every known user is being probed.';
  } catch (e) {
    $('ad-status').textContent = authMessage(e) || 'Resync refused (' + e.code + '): ' + e.message;
  }
});

$('ad-erase-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const jid = $('ad-erase-jid').value.trim();
  if (!jid) return;
  $('cf-text').textContent = 'Everything the bridge keeps about ' + jid + ' is deleted: history, sessions, last-seen.';
  $('cf-input').value = '';
  $('cf-ok').disabled = true;
  $('confirm').dataset.jid = jid;
  $('confirm').showModal();
  $('cf-input').focus();
});
$('cf-input').addEventListener('input', () => {
  $('cf-ok').disabled = $('cf-input').value.trim() !== $('confirm').dataset.jid;
});
$('cf-cancel').addEventListener('click', () => $('confirm').close('cancel'));
$('cf-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const jid = $('confirm').dataset.jid;
  if ($('cf-input').value.trim() !== jid) return;
  $('confirm').close('ok');
  const out = $('ad-erase-out');
  out.textContent = 'Erasing ' + jid + '…';
  try {
    await api('/api/v1/users/' + encodeURIComponent(jid), { method: 'DELETE' });
    out.textContent = jid + ' erased.';
    $('ad-erase-jid').value = '';
  } catch (err) {
    out.textContent = authMessage(err) || 'Not erased (' + err.code + '): ' + err.message;
  }
});

// ---------- alerts strip ----------
async function loadAlerts() {
  try {
    const r = await api('/api/v1/alerts');
    const items = r.alerts.slice(0, 5).map((a) => {
      const li = document.createElement('li');
      li.className = 'alert-item ' + (a.type === 'alert.storm' ? 'storm' : 'flapping');
      const what = a.type === 'alert.storm'
        ? 'Login storm in ' + a.domain + ': ' + a.logins + ' logins within ' + a.window_secs + ' s'
        : a.jid + ' is flapping: ' + a.transitions + ' online/offline changes within ' + a.window_secs + ' s';
      li.textContent = what + ' — ' + relative(a.at) + ' ago';
      return li;
    });
    $('alert-list').replaceChildren(...items);
    $('alert-strip').hidden = items.length === 0;
  } catch (_) { /* the next poll retries */ }
}

// ---------- admin: webhooks ----------
async function loadWebhooks() {
  try {
    const r = await api('/api/v1/webhooks');
    fillRows($('ad-wh').tBodies[0], r.webhooks.map((w) => {
      const actions = document.createElement('span');
      const log = document.createElement('button');
      log.type = 'button'; log.className = 'ghost small'; log.textContent = 'Deliveries';
      log.dataset.log = w.id;
      actions.appendChild(log);
      if (w.source === 'api') {
        const del = document.createElement('button');
        del.type = 'button'; del.className = 'ghost small'; del.textContent = 'Delete';
        del.dataset.del = w.id;
        del.setAttribute('aria-label', 'Delete webhook ' + w.id);
        actions.append(' ', del);
      }
      return [w.id, w.url, w.events.join(', '), w.source === 'api' ? 'API' : 'config file', String(w.pending), actions];
    }));
  } catch (e) {
    $('ad-wh-out').textContent = authMessage(e) || 'Webhooks unavailable: ' + e.message;
  }
}

$('ad-wh').addEventListener('click', async (e) => {
  const del = e.target.closest('button[data-del]');
  const log = e.target.closest('button[data-log]');
  if (del) {
    if (!confirm('Delete webhook ' + del.dataset.del + ' and its pending messages?')) return;
    try {
      await api('/api/v1/webhooks/' + encodeURIComponent(del.dataset.del), { method: 'DELETE' });
      $('ad-wh-out').textContent = 'Webhook ' + del.dataset.del + ' deleted.';
    } catch (err) {
      $('ad-wh-out').textContent = authMessage(err) || 'Not deleted (' + err.code + '): ' + err.message;
    }
    loadWebhooks();
  } else if (log) {
    try {
      const r = await api('/api/v1/webhooks/' + encodeURIComponent(log.dataset.log) + '/deliveries');
      const t = document.createElement('table');
      t.id = 'ad-wh-deliveries';
      t.innerHTML = '<caption></caption><thead><tr><th scope="col">when</th><th scope="col">message</th><th scope="col">type</th><th scope="col">attempt</th><th scope="col">status</th><th scope="col">answer</th></tr></thead><tbody></tbody>';
      t.caption.textContent = 'Last deliveries of ' + log.dataset.log + (r.deliveries.length ? '' : ': none yet');
      fillRows(t.tBodies[0], r.deliveries.map((d) => [new Date(d.at).toLocaleString(), d.message_id, d.type, String(d.attempt), d.status, d.response_status ? String(d.response_status) : (d.error || '—')]));
      $('ad-wh-log').replaceChildren(t);
    } catch (err) {
      $('ad-wh-out').textContent = authMessage(err) || 'Deliveries unavailable: ' + err.message;
    }
  }
});

$('ad-wh-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const events = [...document.querySelectorAll('#ad-wh-form input[name=ev]:checked')].map((x) => x.value);
  const domains = $('ad-wh-domains').value.split(/[\s,;]+/).filter(Boolean);
  const out = $('ad-wh-out');
  try {
    const r = await api('/api/v1/webhooks', { method: 'POST', body: JSON.stringify({ url: $('ad-wh-url').value.trim(), events, domains }) });
    out.textContent = 'Created ' + r.id + '. Its signing secret, shown this once: ';
    const code = document.createElement('code');
    code.id = 'ad-wh-secret';
    code.textContent = r.secret;
    out.appendChild(code);
    $('ad-wh-url').value = '';
    loadWebhooks();
  } catch (err) {
    out.textContent = authMessage(err) || 'Not created (' + err.code + '): ' + err.message;
  }
});

// ---------- start ----------
async function start() {
  readToken();
  if (!st.token) return showLogin('');
  $('login').hidden = true;
  setPhase('connecting');
  try {
    await api('/api/v1/stats');
  } catch (e) {
    return showLogin(authMessage(e) || 'The bridge is unreachable: ' + e.message);
  }
  $('app').hidden = false;
  $('forget').hidden = false;
  $('banner').hidden = true;
  for (const t of ['analytics', 'replay']) $('tab-' + t).hidden = !canReadHistory();
  $('tab-admin').hidden = !st.scopes.includes('admin');
  st.epoch = null;
  connect();
  pollReady();
  loadSpark();
  loadAlerts();
}

setInterval(() => { if (st.token && !$('app').hidden) pollReady(); }, 5000);
setInterval(() => { if (st.token && !$('app').hidden) { loadSpark(); loadAlerts(); } }, 10000);
start();
