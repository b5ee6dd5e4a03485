-- presence-bridge schema v4: window queries over sessions (analytics, replay, exports; contract
-- §6) find the sessions overlapping [from, to) by start and by end, without scanning by JID.
CREATE INDEX presence_sessions_started ON presence_sessions (started_at);
CREATE INDEX presence_sessions_ended ON presence_sessions (ended_at);
