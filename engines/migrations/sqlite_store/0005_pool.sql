-- The server pool's inventory, the purse's ledger of spend, one-time join tokens and lineage.
-- Every factory of the organism shares these; admissions serialize on pool_admission_lock.
CREATE TABLE IF NOT EXISTS pool_servers (
    name               TEXT PRIMARY KEY,
    provider           TEXT NOT NULL,
    hourly_cost_micros BIGINT NOT NULL,
    capacity           INTEGER NOT NULL,
    -- off, powering-on, booting, joined, draining, powering-off, quarantined
    state              TEXT NOT NULL,
    -- The role it was powered on for (joined: the role its cell took).
    role               TEXT,
    cell_id            TEXT,
    request_key        TEXT,
    factory            TEXT,
    -- Power-on attempts since the server was last off by choice.
    attempts           INTEGER NOT NULL DEFAULT 0,
    state_since_ms     BIGINT NOT NULL,
    -- 0 when pool.toml no longer declares it (kept for its history).
    declared           INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS pool_transitions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    server     TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    at_ms      BIGINT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pool_transitions_server ON pool_transitions (server, seq);
-- One row per powered-on period: open (ended_at_ms NULL) from admission until power-off is
-- confirmed, then closed with its amount.
CREATE TABLE IF NOT EXISTS pool_spend (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    server             TEXT NOT NULL,
    hourly_cost_micros BIGINT NOT NULL,
    started_at_ms      BIGINT NOT NULL,
    ended_at_ms        BIGINT,
    amount_micros      BIGINT
);
CREATE INDEX IF NOT EXISTS pool_spend_open ON pool_spend (server, ended_at_ms);
CREATE TABLE IF NOT EXISTS pool_admission_lock (
    id         INTEGER PRIMARY KEY,
    admissions BIGINT NOT NULL
);
INSERT INTO pool_admission_lock (id, admissions) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS join_tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    role          TEXT NOT NULL,
    server        TEXT,
    parent        TEXT,
    request_key   TEXT,
    issued_at_ms  BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    used_at_ms    BIGINT,
    cell_id       TEXT
);
CREATE TABLE IF NOT EXISTS lineage (
    child   TEXT PRIMARY KEY,
    parent  TEXT,
    server  TEXT,
    role    TEXT NOT NULL,
    at_ms   BIGINT NOT NULL
);
