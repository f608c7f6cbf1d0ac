-- Exactly-once client requests: the first answer to a request with an Idempotency-Key, kept
-- until it expires so that every repeat gets it (and a repeat with another body is refused).
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    -- Hash of the request the key was first used with.
    fingerprint TEXT NOT NULL,
    -- Who is serving it (a random token per claim); a completion by anyone else is ignored.
    holder TEXT NOT NULL,
    -- NULL while the request is being served.
    status INTEGER,
    body TEXT,
    -- A claim whose holder died is taken over after this moment (ms since the epoch).
    locked_until_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at_ms);
