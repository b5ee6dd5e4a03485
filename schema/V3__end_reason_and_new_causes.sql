-- presence-bridge schema v3.
-- Two new causes: 'reconcile' (found or closed by comparing with the server's own session
-- list, contract §10) and 'amqp' (MongooseIM's event pusher, contract §9).
ALTER TABLE presence_events DROP CONSTRAINT presence_events_cause_check;
ALTER TABLE presence_events ADD CONSTRAINT presence_events_cause_check
    CHECK (cause IN ('stanza', 'probe', 'resync', 'shutdown', 'reconcile', 'amqp'));
ALTER TABLE presence_sessions DROP CONSTRAINT presence_sessions_end_cause_check;
ALTER TABLE presence_sessions ADD CONSTRAINT presence_sessions_end_cause_check
    CHECK (end_cause IN ('stanza', 'probe', 'resync', 'shutdown', 'reconcile', 'amqp'));
-- Why the server ended a session it closed itself (MongooseIM 'Shutdown by reason: X',
-- Prosody 'Disconnected: X' -> X), or 'presence_error' for a presence error; NULL when the
-- user signed off or the bridge closed it.
ALTER TABLE presence_sessions ADD COLUMN end_reason text;
