-- The factories' shared ledger of request keys: a factory claims a key before it starts a cell,
-- so a key asked of the sibling after the first factory started a cell (and died) is answered
-- with the first cell, not a second one.
CREATE TABLE IF NOT EXISTS factory_claims (
    request_key   TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    factory       TEXT NOT NULL,
    cell_id       TEXT NOT NULL,
    claimed_at_ms INTEGER NOT NULL,
    -- When the cell announced it was ready; NULL while the start is in flight.
    started_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS factory_claims_role ON factory_claims (role, claimed_at_ms);
