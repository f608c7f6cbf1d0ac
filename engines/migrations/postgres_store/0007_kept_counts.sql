-- Kept counts, so /stats reads a few rows instead of scanning the frontier and the pages
-- (issue "Speed": /stats is O(1) in the size of the crawl). Statement-level triggers append
-- one signed delta per (host, state) a statement touched, in the same transaction as the rows
-- they count, whichever version of the code writes those rows. The tables are append-only, so
-- concurrent api cells never wait on a shared counter row; /stats sums them and folds them
-- into one row per key when they have grown (a DELETE ... RETURNING that sees only committed
-- deltas, so none is lost or counted twice).

CREATE TABLE frontier_counts (
    host   TEXT NOT NULL,
    state  TEXT NOT NULL,
    n      BIGINT NOT NULL
);

-- Whole-store counts: 'pages' (stored pages) and 'deferred' (links kept aside).
CREATE TABLE store_counts (
    name  TEXT NOT NULL,
    n     BIGINT NOT NULL
);

INSERT INTO frontier_counts (host, state, n)
    SELECT host, state, count(*) FROM frontier GROUP BY host, state;
INSERT INTO store_counts (name, n) VALUES
    ('pages', (SELECT count(*) FROM pages)),
    ('deferred', (SELECT coalesce(sum(n), 0) FROM deferred_links));

CREATE FUNCTION frontier_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO frontier_counts (host, state, n)
        SELECT host, state, count(*) FROM new_rows GROUP BY host, state;
    RETURN NULL;
END $$;

CREATE FUNCTION frontier_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO frontier_counts (host, state, n)
        SELECT host, state, sum(d) FROM (
            SELECT host, state, -1 AS d FROM old_rows
            UNION ALL
            SELECT host, state, 1 AS d FROM new_rows
        ) AS t GROUP BY host, state HAVING sum(d) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION frontier_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO frontier_counts (host, state, n)
        SELECT host, state, -count(*) FROM old_rows GROUP BY host, state;
    RETURN NULL;
END $$;

CREATE TRIGGER frontier_counts_insert AFTER INSERT ON frontier
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION frontier_counts_insert();
CREATE TRIGGER frontier_counts_update AFTER UPDATE ON frontier
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION frontier_counts_update();
CREATE TRIGGER frontier_counts_delete AFTER DELETE ON frontier
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION frontier_counts_delete();

CREATE FUNCTION pages_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO store_counts (name, n) SELECT 'pages', count(*) FROM new_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE FUNCTION pages_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO store_counts (name, n) SELECT 'pages', -count(*) FROM old_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE TRIGGER pages_count_insert AFTER INSERT ON pages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pages_count_insert();
CREATE TRIGGER pages_count_delete AFTER DELETE ON pages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pages_count_delete();

CREATE FUNCTION deferred_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO store_counts (name, n)
        SELECT 'deferred', sum(n) FROM new_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE FUNCTION deferred_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO store_counts (name, n)
        SELECT 'deferred', -sum(n) FROM old_rows HAVING count(*) > 0;
    RETURN NULL;
END $$;

CREATE TRIGGER deferred_count_insert AFTER INSERT ON deferred_links
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION deferred_count_insert();
CREATE TRIGGER deferred_count_delete AFTER DELETE ON deferred_links
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION deferred_count_delete();
