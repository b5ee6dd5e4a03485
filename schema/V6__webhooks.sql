-- presence-bridge schema v6: the webhook outbox (contract §7).

-- Endpoints made through the API (those of the config file live in the config).
CREATE TABLE webhook_endpoints (
    id         text        PRIMARY KEY,
    url        text        NOT NULL,
    secret     text        NOT NULL,               -- whsec_…, needed to sign after a restart
    events     text[]      NOT NULL,
    domains    text[]      NOT NULL DEFAULT '{}',
    jids       text[]      NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Messages per endpoint, delivered in `ord` order; a message is accepted once committed.
CREATE TABLE webhook_messages (
    endpoint_id     text        NOT NULL,
    ord             bigint      GENERATED ALWAYS AS IDENTITY,
    id              text        NOT NULL,          -- webhook-id, the same on every retry
    type            text        NOT NULL,
    body            text        NOT NULL,
    jid             text,                          -- the user it is about (erasure)
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint_id, ord)
);
CREATE INDEX webhook_messages_pending ON webhook_messages (endpoint_id, ord) WHERE status = 'pending';
CREATE INDEX webhook_messages_jid ON webhook_messages (jid) WHERE jid IS NOT NULL AND status = 'pending';

-- Every attempt (kept a week).
CREATE TABLE webhook_deliveries (
    endpoint_id     text        NOT NULL,
    message_id      text        NOT NULL,
    type            text        NOT NULL,
    attempt         integer     NOT NULL,
    at              timestamptz NOT NULL,
    status          text        NOT NULL CHECK (status IN ('delivered', 'retrying', 'failed')),
    response_status integer,
    error           text
);
CREATE INDEX webhook_deliveries_recent ON webhook_deliveries (endpoint_id, at DESC);
