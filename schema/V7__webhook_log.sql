-- presence-bridge schema v7: the webhook outbox as one log read by every endpoint (fan-out on
-- read). Accepting a change writes one record whatever the number of endpoints; each endpoint
-- keeps a cursor. V6's per-endpoint messages that were still pending are carried over.

CREATE TABLE webhook_log (
    seq        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rid        text        NOT NULL,          -- 32 hex digits; with an endpoint's salt, its webhook-id
    msg_id     text,                          -- an explicit webhook-id (messages carried over from V6)
    type       text        NOT NULL,
    body       text        NOT NULL,
    jid        text,                          -- the user it is about (erasure)
    targets    text[]      NOT NULL,          -- the endpoints whose filters want it
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_log_jid ON webhook_log (jid) WHERE jid IS NOT NULL;

-- Each endpoint's place: every record up to after_seq is finished (delivered or failed) for it;
-- the retry state is about record head_seq.
CREATE TABLE webhook_cursors (
    endpoint_id     text        PRIMARY KEY,
    after_seq       bigint      NOT NULL,
    head_seq        bigint      NOT NULL DEFAULT 0,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO webhook_log (rid, msg_id, type, body, jid, targets)
SELECT '', id, type, body, jid, ARRAY[endpoint_id]
  FROM webhook_messages WHERE status = 'pending' ORDER BY endpoint_id, ord;

INSERT INTO webhook_cursors (endpoint_id, after_seq)
SELECT DISTINCT endpoint_id, 0 FROM webhook_messages WHERE status = 'pending';

DROP TABLE webhook_messages;
