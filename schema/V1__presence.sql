-- presence-bridge schema v1.
-- Applied by `presence-bridge migrate` and at `run` start-up (refinery; history in
-- refinery_schema_history).

-- Append-only presence history, one row per applied presence event of one resource.
-- Partitioned by day on `at` (when it happened); the writer creates partitions on demand and
-- drops those older than store.retention_days. event_id is unique per event, so a replayed
-- batch never duplicates a row (the primary key must contain the partition key).
CREATE TABLE presence_events (
    event_id    uuid        NOT NULL,
    at          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    jid         text        NOT NULL,
    resource    text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('available', 'unavailable')),
    show        text        CHECK (show IN ('chat', 'available', 'away', 'xa', 'dnd')),
    status      text,
    priority    smallint,
    client      text,
    idle_since  timestamptz,
    cause       text        NOT NULL CHECK (cause IN ('stanza', 'probe', 'resync', 'shutdown')),
    PRIMARY KEY (event_id, at)
) PARTITION BY RANGE (at);

-- History of one JID by time.
CREATE INDEX presence_events_jid_at ON presence_events (jid, at DESC, event_id DESC);

-- One row per resource online interval.
CREATE TABLE presence_sessions (
    session_id  uuid        PRIMARY KEY,          -- the id of the event that opened it
    jid         text        NOT NULL,
    resource    text        NOT NULL,
    client      text,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    end_cause   text        CHECK (end_cause IN ('stanza', 'probe', 'resync', 'shutdown'))
);
CREATE INDEX presence_sessions_jid_started ON presence_sessions (jid, started_at DESC);
CREATE INDEX presence_sessions_open ON presence_sessions (jid, resource) WHERE ended_at IS NULL;

-- One row per user: the latest aggregate, for last-seen lookups that survive restarts.
CREATE TABLE presence_last_seen (
    jid          text        PRIMARY KEY,
    online       boolean     NOT NULL,
    online_since timestamptz,
    last_seen    timestamptz,
    show         text        NOT NULL,
    status       text,
    updated_at   timestamptz NOT NULL            -- receive time of the event that set it
);

-- Small key/value facts about the bridge itself (e.g. when it last stopped).
CREATE TABLE bridge_state (
    key   text PRIMARY KEY,
    value text NOT NULL
);
