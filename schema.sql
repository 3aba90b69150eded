-- immagent storage layout, version 1 (PostgreSQL). Applied by Store.init_schema().
-- Idempotent: every statement is IF NOT EXISTS. The schema version lives in
-- immagent_schema; init_schema() refuses a database whose version it does not know.

CREATE TABLE IF NOT EXISTS immagent_schema (
    version     integer     PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The append-only content log. A row is never updated: its digest is blake3 over the
-- kind, refs and body (assets.digest_of), so a digest can only ever name one row. `refs`
-- holds the digests this asset points at (conversation node -> parent node, then its
-- messages), concatenated 32 bytes each, NULL when there are none; a node's links are
-- stored only here, and gc computes reachability from it in SQL without decoding bodies. Rows are kept lean on purpose (no timestamp, no array headers): every
-- conversation turn adds about three of them.
CREATE TABLE IF NOT EXISTS immagent_assets (
    digest      bytea       PRIMARY KEY CHECK (octet_length(digest) = 32),
    kind        smallint    NOT NULL,
    refs        bytea       CHECK (octet_length(refs) % 32 = 0),
    body        bytea       NOT NULL
);

-- The digests in a refs value, in order (the first is a node's parent when it has one).
-- STRICT keeps the planner from inlining it into generate_series, whose default estimate
-- of 1000 rows per call made gc plans spill to thousands of hash batches; ROWS 3 is the
-- typical node (parent + user + assistant).
CREATE OR REPLACE FUNCTION immagent_refs(refs bytea) RETURNS SETOF bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ROWS 3 AS $$
    SELECT substring(refs FROM i * 32 + 1 FOR 32)
      FROM generate_series(0, coalesce(octet_length(refs), 0) / 32 - 1) AS i
$$;

-- One row per agent state. Rows are inserted, or deleted by delete(); never updated.
-- parent_id is deliberately not a foreign key: deleting a parent must not touch its
-- children, and lineage walks stop at a missing parent. Listing orders by id (UUIDv7,
-- time-ordered, served by the primary key); seq is the commit-order position in the log
-- for incremental consumers.
CREATE TABLE IF NOT EXISTS immagent_agents (
    id            uuid        PRIMARY KEY,
    parent_id     uuid,
    name          text        NOT NULL,
    model         text        NOT NULL,
    digest        bytea       NOT NULL,
    system_prompt bytea       NOT NULL,
    conversation  bytea       NOT NULL,
    model_config  bytea       NOT NULL,  -- canonical msgpack of a JSON-like map
    metadata      bytea       NOT NULL,  -- canonical msgpack of a JSON-like map
    created_at    timestamptz NOT NULL,
    seq           bigint      GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX IF NOT EXISTS immagent_agents_parent ON immagent_agents (parent_id);
-- (name) alone, not (name, id): B-tree deduplication then stores each name once per page.
CREATE INDEX IF NOT EXISTS immagent_agents_name ON immagent_agents (name);
