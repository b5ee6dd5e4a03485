-- presence_last_seen is rewritten for every presence change: leave room in each page so the
-- update stays on the page (a HOT update: no new index entry, far less write amplification).
ALTER TABLE presence_last_seen SET (fillfactor = 50);
-- Sessions are updated once (when they end).
ALTER TABLE presence_sessions SET (fillfactor = 80);
