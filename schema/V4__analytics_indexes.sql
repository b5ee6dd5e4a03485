-- presence-bridge schema v4: the window queries of contract §6 (analytics, replay, events,
-- exports) without scanning history.
-- Sessions as time ranges (an open session's range is unbounded above): "overlaps [from, to)"
-- is `&&`, "online at T" is `@>`, both answered by this GiST index. An end before the start
-- (which replays and clock skew can write) is taken as an empty session, never an error: a
-- row the index cannot take would stop the writer.
CREATE INDEX presence_sessions_span ON presence_sessions
    USING gist (tstzrange(started_at, CASE WHEN ended_at IS NULL THEN NULL ELSE greatest(started_at, ended_at) END, '[)'));
-- The sessions export pages by start.
CREATE INDEX presence_sessions_started ON presence_sessions (started_at, session_id);
-- Replay walks back through a user's sessions that reach the start of their online stretch.
CREATE INDEX presence_sessions_jid_ended ON presence_sessions (jid, ended_at);
-- Every user's events in a window, in time order (events pages, exports, replay's inputs).
CREATE INDEX presence_events_at ON presence_events (at, event_id);
