-- Kept counts, so /stats reads a few rows instead of scanning the frontier and the pages
-- (issue "Speed": /stats is O(1) in the size of the crawl). Triggers keep them in the same
-- transaction as the rows they count, whichever version of the code writes those rows.

-- Frontier entries per host and state.
CREATE TABLE frontier_counts (
    host   TEXT NOT NULL,
    state  TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (host, state)
) WITHOUT ROWID;

-- Whole-store counts: 'pages' (stored pages) and 'deferred' (links kept aside).
CREATE TABLE store_counts (
    name  TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO frontier_counts (host, state, n)
    SELECT host, state, count(*) FROM frontier GROUP BY host, state;
INSERT INTO store_counts (name, n) VALUES
    ('pages', (SELECT count(*) FROM pages)),
    ('deferred', (SELECT coalesce(sum(n), 0) FROM deferred_links));

CREATE TRIGGER frontier_counts_insert AFTER INSERT ON frontier BEGIN
    INSERT INTO frontier_counts (host, state, n) VALUES (NEW.host, NEW.state, 1)
        ON CONFLICT (host, state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER frontier_counts_update AFTER UPDATE OF host, state ON frontier
    WHEN OLD.state IS NOT NEW.state OR OLD.host IS NOT NEW.host
BEGIN
    UPDATE frontier_counts SET n = n - 1 WHERE host = OLD.host AND state = OLD.state;
    INSERT INTO frontier_counts (host, state, n) VALUES (NEW.host, NEW.state, 1)
        ON CONFLICT (host, state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER frontier_counts_delete AFTER DELETE ON frontier BEGIN
    UPDATE frontier_counts SET n = n - 1 WHERE host = OLD.host AND state = OLD.state;
END;

CREATE TRIGGER pages_count_insert AFTER INSERT ON pages BEGIN
    UPDATE store_counts SET n = n + 1 WHERE name = 'pages';
END;

CREATE TRIGGER pages_count_delete AFTER DELETE ON pages BEGIN
    UPDATE store_counts SET n = n - 1 WHERE name = 'pages';
END;

CREATE TRIGGER deferred_count_insert AFTER INSERT ON deferred_links BEGIN
    UPDATE store_counts SET n = n + NEW.n WHERE name = 'deferred';
END;

CREATE TRIGGER deferred_count_delete AFTER DELETE ON deferred_links BEGIN
    UPDATE store_counts SET n = n - OLD.n WHERE name = 'deferred';
END;
