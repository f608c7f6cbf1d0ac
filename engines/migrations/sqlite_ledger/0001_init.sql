-- The host ledger (engines/src/politeness.rs) in a database file of its own beside the store's
-- (`<store>-ledger.db`): a permit request takes this file's write lock, not the one every ingest
-- batch holds, so a crawler's permit does not wait behind an index update.
-- last_start_ms: start of the latest request granted; blocked_until_ms: Retry-After and kin.
CREATE TABLE host_ledger (
    host              TEXT PRIMARY KEY,
    last_start_ms     INTEGER NOT NULL DEFAULT 0,
    blocked_until_ms  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Permits in flight; a permit not released by its expiry (its crawler died) lapses.
CREATE TABLE host_permits (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    host        TEXT NOT NULL,
    expires_ms  INTEGER NOT NULL
);
CREATE INDEX host_permits_by_host ON host_permits (host, expires_ms);
