-- presence-bridge schema v5: rollups of complete days, so that the window queries of contract
-- §6 read one small row per user-day, client-day and minute instead of every session.
-- Sessions stay the source of truth: a day's rollup is computed from them by the same code as
-- the live query (exact by construction), written in one transaction, and deleted by the
-- writer (in the same transaction as the sessions) whenever a batch touches that day or an
-- earlier one (a late or replayed batch); the builder then computes it again.

-- The days whose rollup is built.
CREATE TABLE presence_rollup_days (
    day      date        PRIMARY KEY,
    built_at timestamptz NOT NULL,
    sessions integer     NOT NULL            -- sessions read to build it
);

-- Per user and day: the union of the user's sessions inside the day, and sessions started.
CREATE TABLE presence_rollup_user_day (
    day     date    NOT NULL,
    jid     text    NOT NULL,
    millis  bigint  NOT NULL,
    started integer NOT NULL,
    PRIMARY KEY (day, jid)
);

-- Per client and day: the sum of its sessions inside the day, and sessions started.
CREATE TABLE presence_rollup_client_day (
    day     date    NOT NULL,
    client  text    NOT NULL,
    millis  bigint  NOT NULL,
    started integer NOT NULL,
    PRIMARY KEY (day, client)
);

-- Per minute, for all domains (scope '') and per domain: the most users and resources online
-- at one instant of the minute, and the first instant the most users were. Minutes with
-- nobody online have no row.
CREATE TABLE presence_rollup_minute (
    scope     text        NOT NULL,
    minute    timestamptz NOT NULL,
    users     integer     NOT NULL,
    resources integer     NOT NULL,
    users_at  timestamptz NOT NULL,
    PRIMARY KEY (scope, minute)
);

-- Replay walks back from an instant through one user's sessions that reach the start of their
-- online stretch: "this user's sessions overlapping this instant" is one probe of this index
-- (btree_gist gives GiST the equality on jid; a trusted extension shipped with Postgres).
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE INDEX presence_sessions_jid_span ON presence_sessions
    USING gist (jid, tstzrange(started_at, CASE WHEN ended_at IS NULL THEN NULL ELSE greatest(started_at, ended_at) END, '[)'));
