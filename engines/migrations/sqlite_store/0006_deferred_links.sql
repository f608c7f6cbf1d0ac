-- Links of stored pages kept aside while their api was busy with clients (seed 003: throttle
-- before dividing), written in the same transaction as the pages; offered to the frontier later
-- by any api, so nothing kept is lost if the api that kept it dies.
CREATE TABLE deferred_links (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    crawl_id    INTEGER NOT NULL,
    depth       INTEGER NOT NULL,   -- the depth the links are offered at
    links       TEXT NOT NULL,      -- JSON array of [url, host] pairs
    n           INTEGER NOT NULL,   -- how many links
    created_ms  INTEGER NOT NULL
);
