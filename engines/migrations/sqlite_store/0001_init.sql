-- Crawl requests and their limits.
CREATE TABLE crawls (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms  INTEGER NOT NULL,
    max_depth   INTEGER,           -- NULL: unlimited
    max_pages   INTEGER,           -- NULL: unlimited
    admitted    INTEGER NOT NULL DEFAULT 0
);

-- Every URL ever accepted, and where it is in its life.
-- state: 'pending' (not yet on the queue), 'queued' (on the queue or being crawled),
--        'crawled', 'failed' (reason says why).
CREATE TABLE frontier (
    url         TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    crawl_id    INTEGER NOT NULL,
    depth       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    updated_ms  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX frontier_by_state ON frontier (state, updated_ms);
CREATE INDEX frontier_by_host ON frontier (host, state);

-- URLs admitted per host, for the per-host page budget.
CREATE TABLE host_budget (
    host        TEXT PRIMARY KEY,
    admitted    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE pages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    url         TEXT NOT NULL UNIQUE,
    host        TEXT NOT NULL,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,
    fetched_ms  INTEGER NOT NULL
);

CREATE VIRTUAL TABLE pages_fts USING fts5 (
    title, body,
    content = 'pages', content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER pages_ai AFTER INSERT ON pages BEGIN
    INSERT INTO pages_fts (rowid, title, body) VALUES (new.id, new.title, new.body);
END;
CREATE TRIGGER pages_ad AFTER DELETE ON pages BEGIN
    INSERT INTO pages_fts (pages_fts, rowid, title, body) VALUES ('delete', old.id, old.title, old.body);
END;
CREATE TRIGGER pages_au AFTER UPDATE ON pages BEGIN
    INSERT INTO pages_fts (pages_fts, rowid, title, body) VALUES ('delete', old.id, old.title, old.body);
    INSERT INTO pages_fts (rowid, title, body) VALUES (new.id, new.title, new.body);
END;
