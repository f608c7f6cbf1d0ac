-- Ready and leased jobs. A job is leased by moving visible_ms into the future; an ack deletes it;
-- an expired lease makes it visible (deliverable) again.
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    body        BLOB NOT NULL,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    visible_ms  INTEGER NOT NULL,
    leased      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_visible ON jobs (visible_ms);

-- The dead-letter queue: jobs delivered too often, or refused as poison.
CREATE TABLE dead (
    id          INTEGER PRIMARY KEY,
    body        BLOB NOT NULL,
    deliveries  INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    taken_ms    INTEGER NOT NULL DEFAULT 0
);
